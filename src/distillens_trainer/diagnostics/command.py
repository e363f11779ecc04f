"""``distillens lens``: the logit-lens profile of a student (against a teacher, or alone) on a data file.

Writes ``lens.json`` (schema in :mod:`distillens_trainer.diagnostics.report`) and PNG figures to
``--output_dir``. Data are read and tokenised exactly as ``distillens train`` does (same prompt templates
and columns); models are loaded as ``distillens train`` loads its student and teacher.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import DataArguments, build_datasets
from ..divergences import DIVERGENCE_NAMES, check_divergence_name
from ..files import check_output_dir, write_json_atomic
from ..layer_map import LayerPair, resolve_layer_map
from ..modeling import DTYPE_NAMES, check_dtype_name, freeze, num_hidden_layers
from ..pipeline import ModelArguments, load_student, load_tokenizer
from ..teacher import load_teacher, load_teacher_tokenizer, resolve_teacher_dtype, shared_vocab_size
from .figures import write_figures
from .profile import DEFAULT_CHUNK_SIZE
from .report import profile_models

logger = logging.getLogger(__name__)

REPORT_NAME = "lens.json"
DTYPES = DTYPE_NAMES
DEFAULT_NUM_PAIRS = 5  # the paper's K
# DataArguments fields that say how rows become prompt + response tokens: shared with `distillens train`.
_FORMAT_FIELDS = (
    "prompt_template",
    "instruction_column",
    "input_column",
    "output_column",
    "prompt_column",
    "completion_column",
    "messages_column",
    "max_length",
    "max_prompt_length",
    "long_prompt_strategy",
)
_DATA_FIELDS = {data_field.name: data_field for data_field in dataclasses.fields(DataArguments)}


def _data_field(name: str) -> Any:
    """The same default and help as ``DataArguments.<name>``: one place for each fact."""
    return field(default=_DATA_FIELDS[name].default, metadata=dict(_DATA_FIELDS[name].metadata))


@dataclass
class LensArguments:
    """What ``distillens lens`` profiles, on which data, and where the results go."""

    model_name_or_path: str = field(metadata={"help": "Student model: a local folder or a hub id."})
    data_file: str = field(
        metadata={
            "help": "Data: a .json/.jsonl/.csv/.parquet file or a save_to_disk folder, as for training."
        }
    )
    output_dir: str = field(metadata={"help": "Where lens.json and the PNG figures are written."})
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher model (folder or hub id); without it the student is profiled alone."},
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "Profile the model in this GGUF file inside model_name_or_path (de-quantised; the tokenizer "
            "too unless tokenizer_name_or_path is given). Needs the gguf extra."
        },
    )
    teacher_gguf_file: str | None = field(
        default=None,
        metadata={"help": "The teacher's GGUF file inside teacher_model_name_or_path (de-quantised)."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or hub id; defaults to model_name_or_path."}
    )
    max_samples: int = field(default=256, metadata={"help": "Use the first N rows of the data file."})
    max_tokens: int = field(
        default=8192, metadata={"help": "Use at most this many response tokens (the first ones, in order)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Rows per forward pass."})
    token_chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE,
        metadata={
            "help": "Tokens whose per-layer log-probabilities ([layers, tokens, vocab]) are held at once."
        },
    )
    divergences: list[str] = field(
        default_factory=lambda: ["jsd"],
        metadata={
            "help": "Divergences for the heatmap and curves (first = the curves'); fkl, rkl, skl, jsd, tvd as "
            "in training, student layer first.",
            "choices": list(DIVERGENCE_NAMES),
        },
    )
    jsd_beta: float = field(default=0.5, metadata={"help": "β of the generalised JSD, as in training."})
    lens_final_norm: bool = field(
        default=True,
        metadata={"help": "Apply the final norm before the LM head in the lens, as in training."},
    )
    lens_num_layers: int | None = field(
        default=None,
        metadata={
            "help": "Layer pairs of the paper's automatic map, marked in the figures (default 5, fewer for a "
            "shallow student)."
        },
    )
    lens_student_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Explicit student layers of the training's layer map (hidden_states)."},
    )
    lens_teacher_layers: list[int] | None = field(
        default=None, metadata={"help": "Explicit teacher layers, one per student layer."}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype both models are loaded in (auto = each checkpoint's).",
            "choices": list(DTYPES),
        },
    )
    device: str | None = field(
        default=None, metadata={"help": "Device, e.g. cuda:0 or cpu (default: cuda if any)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the hub."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow writing into a non-empty output_dir (its lens files are replaced)."},
    )
    prompt_template: str = _data_field("prompt_template")
    instruction_column: str = _data_field("instruction_column")
    input_column: str = _data_field("input_column")
    output_column: str = _data_field("output_column")
    prompt_column: str = _data_field("prompt_column")
    completion_column: str = _data_field("completion_column")
    messages_column: str = _data_field("messages_column")
    max_length: int = _data_field("max_length")
    max_prompt_length: int = _data_field("max_prompt_length")
    long_prompt_strategy: str = _data_field("long_prompt_strategy")

    def __post_init__(self) -> None:
        for name in ("max_samples", "max_tokens", "batch_size", "token_chunk_size"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1.")
        if not self.divergences:
            raise ValueError("divergences is empty: give at least one, e.g. --divergences jsd.")
        for name in self.divergences:
            check_divergence_name(name, "divergences")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta={self.jsd_beta} must lie in [0, 1].")
        check_dtype_name("dtype", self.dtype)
        if self.teacher_model_name_or_path is None and (self.lens_student_layers or self.lens_teacher_layers):
            raise ValueError("lens_student_layers/lens_teacher_layers need --teacher_model_name_or_path.")
        if self.teacher_model_name_or_path is None and self.teacher_gguf_file:
            raise ValueError(
                "teacher_gguf_file needs --teacher_model_name_or_path (the folder that holds it)."
            )
        self.data_arguments()  # the formatting fields are checked where training checks them

    def data_arguments(self) -> DataArguments:
        """The ``distillens train`` data settings that read ``data_file`` the same way."""
        formatting = {name: getattr(self, name) for name in _FORMAT_FIELDS}
        return DataArguments(train_file=self.data_file, max_train_samples=self.max_samples, **formatting)

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def mapped_layer_pairs(
    args: LensArguments, student_num_layers: int, teacher_num_layers: int
) -> list[LayerPair]:
    """The training's layer map for these options; by default the paper's K = 5, or fewer for a shallow student."""
    num_pairs = args.lens_num_layers
    if num_pairs is None and args.lens_student_layers is None:
        num_pairs = min(DEFAULT_NUM_PAIRS, student_num_layers - 1)
        if num_pairs < 1:
            return []
    return resolve_layer_map(
        student_num_layers,
        teacher_num_layers,
        args.lens_student_layers,
        args.lens_teacher_layers,
        num_pairs if num_pairs is not None else DEFAULT_NUM_PAIRS,
    )


def _load_models(args: LensArguments, tokenizer: Any) -> tuple[torch.nn.Module, torch.nn.Module | None, int]:
    """Student, teacher (or None) on the device, frozen, and the vocabulary size they share."""
    device = args.resolved_device()
    student = load_student(
        ModelArguments(
            model_name_or_path=args.model_name_or_path,
            gguf_file=args.gguf_file,
            model_dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
        )
    )
    student = freeze(student).to(device)
    if args.teacher_model_name_or_path is None:
        return student, None, shared_vocab_size(student, student, tokenizer, tokenizer)
    teacher = load_teacher(
        args.teacher_model_name_or_path,
        resolve_teacher_dtype(args.dtype),
        gguf_file=args.teacher_gguf_file,
        trust_remote_code=args.trust_remote_code,
    )
    teacher = freeze(teacher).to(device)
    teacher_tokenizer = load_teacher_tokenizer(args.teacher_model_name_or_path, args.teacher_gguf_file)
    return student, teacher, shared_vocab_size(student, teacher, tokenizer, teacher_tokenizer)


def run_lens(args: LensArguments) -> dict[str, Any]:
    """Profile, write ``lens.json`` and the figures; returns the report (with ``figures`` added)."""
    check_output_dir(
        args.output_dir,
        allowed=args.overwrite_output_dir,
        how_to_allow="pass --overwrite_output_dir true to replace its lens files",
    )
    tokenizer = load_tokenizer(
        args.tokenizer_name_or_path or args.model_name_or_path,
        args.trust_remote_code,
        gguf_file=None if args.tokenizer_name_or_path else args.gguf_file,
    )
    dataset, _ = build_datasets(args.data_arguments(), tokenizer)
    student, teacher, vocab_size = _load_models(args, tokenizer)
    mapped = (
        mapped_layer_pairs(args, num_hidden_layers(student), num_hidden_layers(teacher))
        if teacher is not None
        else []
    )
    report = profile_models(
        student,
        teacher,
        dataset,
        tokenizer,
        vocab_size=vocab_size,
        mapped_pairs=mapped,
        divergences=args.divergences,
        jsd_beta=args.jsd_beta,
        lens_final_norm=args.lens_final_norm,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        chunk_size=args.token_chunk_size,
        student_name=Path(args.gguf_file or args.model_name_or_path).name or args.model_name_or_path,
        teacher_name=Path(args.teacher_gguf_file or args.teacher_model_name_or_path or "teacher").name,
    )
    report["settings"] = dataclasses.asdict(args)
    output_dir = Path(args.output_dir)
    write_json_atomic(output_dir / REPORT_NAME, report)
    figures = write_figures(report, output_dir)
    logger.info("lens profile of %d response tokens written to %s", report["num_tokens"], output_dir)
    return {**report, "figures": figures}


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few lines for the terminal: the headline numbers, then one line saying where the files went."""
    divergence = report["divergences"][0]
    lines = [f"{report['num_tokens']} response tokens from {report['num_examples']} examples"]
    if report["same_depth"]:
        values = ", ".join(
            f"s{s}\u2192t{t} {value:.3f}"
            for (s, t), value in zip(report["same_depth"]["pairs"], report["same_depth"][divergence])
        )
        lines.append(f"{divergence} per student layer vs the same-depth teacher layer: {values}")
    else:
        values = ", ".join(
            f"s{s} {value:.3f}"
            for s, value in zip(
                report["student"]["layers"], report["student"]["divergence_to_final"][divergence]
            )
        )
        lines.append(f"{divergence} per student layer vs its own output: {values}")
    output_dir = Path(report["settings"]["output_dir"])
    figures = ", ".join(Path(path).name for path in report["figures"].values()) or "none (no matplotlib)"
    lines.append(
        f"distillens lens: report in {output_dir / REPORT_NAME}, figures in {output_dir}: {figures} "
        f"(prompt format {report['settings']['prompt_template']!r})."
    )
    return lines
