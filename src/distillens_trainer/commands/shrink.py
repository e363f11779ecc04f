"""``distillens shrink``: cut a student from a model's blocks and save it with its tokenizer and prompt format."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedModel

from ..files import (
    check_output_dir,
    give_user_modes,
    make_staging_dir,
    overwrite_output_dir_field,
    writing_into,
)
from ..models.facts import DTYPE_NAMES, check_dtype_name, torch_dtype
from ..models.info import recorded_prompt_template, write_model_info
from ..models.loading import load_causal_lm, load_tokenizer_from, split_gguf_path
from ..models.shrink import (
    block_list,
    check_keep_layers,
    evenly_spaced_layers,
    recorded_kept_layers,
    shrink_model,
)
from .parsing import parse_command

logger = logging.getLogger(__name__)


@dataclass
class ShrinkArguments:
    """Settings of ``distillens shrink``."""

    model_name_or_path: str = field(
        metadata={"help": "The model to cut: a local folder, a hub id, or a .gguf file."}
    )
    output_dir: str = field(metadata={"help": "Folder for the shrunk model (config, weights, tokenizer)."})
    gguf_file: str | None = field(
        default=None,
        metadata={"help": "Read the model (and tokenizer) from this GGUF file in model_name_or_path."},
    )
    num_layers: int | None = field(
        default=None,
        metadata={"help": "Keep this many evenly spaced blocks, the first and the last included."},
    )
    keep_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Keep exactly these blocks (0-based, increasing), instead of num_layers."},
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the written weights (auto = the loaded model's).",
            "choices": list(DTYPE_NAMES),
        },
    )
    overwrite_output_dir: bool = overwrite_output_dir_field("its files may be replaced")

    def __post_init__(self) -> None:
        if (self.num_layers is None) == (self.keep_layers is None):
            raise ValueError(
                "give either num_layers or keep_layers (exactly one) to say which blocks to keep."
            )
        check_dtype_name("dtype", self.dtype)
        self.model_name_or_path, self.gguf_file = split_gguf_path(self.model_name_or_path, self.gguf_file)


def prompt_format_of(model_name_or_path: str, tokenizer: object | None) -> str | None:
    """The prompt format the shrunk model inherits: the source's recorded one, else ``chat`` when its tokenizer
    has a chat template (an instruct model), else None (nothing recorded)."""
    recorded = recorded_prompt_template(model_name_or_path)
    if recorded is not None:
        return recorded
    return "chat" if getattr(tokenizer, "chat_template", None) else None


def _save_atomically(
    model: PreTrainedModel, tokenizer: object | None, output_dir: Path, prompt_template: str | None
) -> None:
    """Write into a temporary sibling folder, then move it in place: a failure leaves ``output_dir`` as it was."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(output_dir.parent, output_dir.name)
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if prompt_template is not None:
            write_model_info(staging, prompt_template=prompt_template)
        give_user_modes(staging)
        if output_dir.is_dir():
            for item in staging.iterdir():
                os.replace(item, output_dir / item.name)
        else:
            os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_shrink(args: ShrinkArguments) -> PreTrainedModel:
    """Load ``args.model_name_or_path``, keep the chosen blocks, and save model + tokenizer in ``output_dir``."""
    check_output_dir(
        args.output_dir, allowed=args.overwrite_output_dir, how_to_allow="pass --overwrite_output_dir true"
    )
    dtype = torch_dtype(args.dtype)
    model = load_causal_lm(args.model_name_or_path, gguf_file=args.gguf_file, dtype=dtype)
    _, _, blocks = block_list(model)
    if args.keep_layers is not None:
        keep_layers = check_keep_layers(args.keep_layers, len(blocks))
    else:
        keep_layers = evenly_spaced_layers(len(blocks), args.num_layers)
    shrunk = shrink_model(model, keep_layers)
    try:
        tokenizer = load_tokenizer_from(args.model_name_or_path, args.gguf_file)
    except (OSError, ValueError, TypeError):
        tokenizer = None
        logger.warning(
            "no tokenizer found beside %s: the shrunk model is written without one.", args.model_name_or_path
        )
    prompt_template = prompt_format_of(args.model_name_or_path, tokenizer)
    _save_atomically(shrunk, tokenizer, Path(args.output_dir), prompt_template)
    logger.info(
        "kept blocks %s of %d -> %s (prompt format %s)",
        keep_layers, len(blocks), args.output_dir, prompt_template or "not recorded",
    )  # fmt: skip
    return shrunk


def main(argv: Sequence[str]) -> int:
    """``distillens shrink [CONFIG] --model_name_or_path T --num_layers K --output_dir S``."""
    (shrink_args,) = parse_command((ShrinkArguments,), argv, "distillens shrink")
    with writing_into(shrink_args.output_dir):
        model = run_shrink(shrink_args)
    kept = recorded_kept_layers(model.config)
    print(f"kept blocks {kept} -> {shrink_args.output_dir} ({model.num_parameters() / 1e6:.1f}M parameters)")
    return 0
