"""``distillens shrink``: a depth-pruned student cut from a teacher (DistilBERT, Minitron, Sheared-LLaMA style).

The student keeps a subset of the teacher's blocks, in order, with the teacher's embeddings, final norm and
LM head, so it shares the teacher's tokenizer and starts close to it. The kept block indices (0-based,
teacher numbering) are recorded in the config under ``distillens_kept_layers``; ``lens_layer_map='shrunk'``
pairs each student block with the teacher block it came from.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from .files import check_output_dir
from .layer_map import KEPT_LAYERS_CONFIG_KEY
from .model_info import recorded_prompt_template, write_model_info
from .modeling import DTYPE_NAMES, check_dtype_name, torch_dtype
from .models import load_causal_lm, load_tokenizer_from

logger = logging.getLogger(__name__)

# model_type -> dotted path, from the *ForCausalLM model, of the ModuleList of transformer blocks
BLOCK_PATHS: dict[str, str] = {
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3"),
        "model.layers",
    ),
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}
# config attributes holding one entry per block, cut along with the blocks
PER_LAYER_CONFIG_LISTS: tuple[str, ...] = ("layer_types", "no_rope_layers")
SHRINK_DTYPES: tuple[str, ...] = DTYPE_NAMES


def evenly_spaced_layers(num_layers: int, num_kept: int) -> list[int]:
    """``num_kept`` block indices spread evenly over ``0..num_layers-1``, the first and the last included.

    Positions round half up: 30 blocks, 10 kept -> 0, 3, 6, 10, 13, 16, 19, 23, 26, 29.
    """
    if not 2 <= num_kept <= num_layers:
        raise ValueError(
            f"num_layers={num_kept} must lie in 2..{num_layers} (the teacher's block count) to keep the first "
            "and the last block; pass --keep_layers for a single block."
        )
    span = num_layers - 1
    return [(2 * i * span + num_kept - 1) // (2 * (num_kept - 1)) for i in range(num_kept)]


def check_keep_layers(keep_layers: Sequence[int], num_layers: int) -> list[int]:
    """``keep_layers`` as a list, or ValueError unless it is non-empty, increasing and within the model."""
    keep_layers = list(keep_layers)
    if not keep_layers:
        raise ValueError("keep_layers is empty: give at least one block index.")
    for index in keep_layers:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_layers:
            raise ValueError(
                f"keep_layers holds {index!r}, but the model has {num_layers} blocks: use indices in "
                f"0..{num_layers - 1} (0 is the first block)."
            )
    if any(later <= earlier for earlier, later in pairwise(keep_layers)):
        raise ValueError(
            f"keep_layers={keep_layers} must be strictly increasing: list each block once, in order."
        )
    return keep_layers


def block_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent module, attribute name, ModuleList) of the model's transformer blocks; ValueError if unknown."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in BLOCK_PATHS:
        raise ValueError(
            f"model_type {model_type!r} cannot be cut: distillens shrink supports {', '.join(sorted(BLOCK_PATHS))} "
            "causal LMs."
        )
    *parent_path, name = BLOCK_PATHS[model_type].split(".")
    parent = model
    for attribute in parent_path:
        parent = getattr(parent, attribute, None)
    blocks = getattr(parent, name, None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no {BLOCK_PATHS[model_type]} block list: load the model with its "
            "*ForCausalLM class (e.g. through AutoModelForCausalLM)."
        )
    return parent, name, blocks


def _renumber_blocks(blocks: nn.ModuleList) -> None:
    """Set every ``layer_idx`` inside block k to k, so the KV cache indexes the shrunk stack correctly."""
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index


def shrink_model(model: PreTrainedModel, keep_layers: Sequence[int]) -> PreTrainedModel:
    """A copy of ``model`` with only the blocks ``keep_layers`` (0-based, increasing); ``model`` is untouched.

    Embeddings, final norm and LM head are the model's own (tied weights stay tied); per-block config lists
    (``layer_types``, ...) are cut the same way; the kept indices go in ``config.distillens_kept_layers``.
    The copy is trainable (``requires_grad``) even when ``model`` is a frozen teacher.
    """
    _, _, blocks = block_list(model)
    keep_layers = check_keep_layers(keep_layers, len(blocks))
    shrunk = copy.deepcopy(model)
    parent, name, shrunk_blocks = block_list(shrunk)
    kept_blocks = nn.ModuleList([shrunk_blocks[index] for index in keep_layers])
    _renumber_blocks(kept_blocks)
    setattr(parent, name, kept_blocks)
    config = shrunk.config
    num_layers = len(blocks)
    for attribute in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, attribute, None)
        if isinstance(values, list | tuple) and len(values) == num_layers:
            setattr(config, attribute, [values[index] for index in keep_layers])
    config.num_hidden_layers = len(keep_layers)
    setattr(config, KEPT_LAYERS_CONFIG_KEY, keep_layers)
    return shrunk.requires_grad_(True)


@dataclass
class ShrinkArguments:
    """Settings of ``distillens shrink``."""

    model_name_or_path: str = field(metadata={"help": "The model to cut: a local folder or a hub id."})
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
            "choices": list(SHRINK_DTYPES),
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow writing into a non-empty output_dir (its files may be replaced)."},
    )

    def __post_init__(self) -> None:
        if (self.num_layers is None) == (self.keep_layers is None):
            raise ValueError(
                "give either num_layers or keep_layers (exactly one) to say which blocks to keep."
            )
        check_dtype_name("dtype", self.dtype)


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
    staging = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}."))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if prompt_template is not None:
            write_model_info(staging, prompt_template=prompt_template)
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
