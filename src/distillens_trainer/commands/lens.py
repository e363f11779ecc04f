"""``distillens lens``: the logit-lens profile of a student (against a teacher, or alone) on a data file.

Writes ``lens.json`` (schema in :mod:`distillens_trainer.diagnostics.report`) and PNG figures to
``--output_dir``. Data are read and tokenised exactly as ``distillens train`` does (same prompt templates
and columns); models are loaded as ``distillens train`` loads its student and teacher.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.arguments import DataArguments, PromptFormatArguments
from ..data.building import build_datasets
from ..diagnostics.figures import write_figures
from ..diagnostics.profile import DEFAULT_MEMORY_BUDGET_MIB
from ..diagnostics.report import finite_or_null, profile_models
from ..files import check_output_dir, overwrite_output_dir_field, write_json_atomic, writing_into
from ..loss.divergences import DIVERGENCE_NAMES, check_divergence_name
from ..loss.layer_map import (
    LAYER_MAPS,
    LayerPair,
    check_layer_map_choice,
    resolve_layer_map,
    shrunk_kept_layers,
)
from ..loss.spec import check_temperature_and_beta
from ..models.facts import check_fits_contexts, freeze, num_hidden_layers
from ..models.info import RESOLVED_CONFIG_NAME, choose_prompt_template
from ..models.loading import ModelArguments, load_student, load_student_tokenizer, read_config
from ..teacher.loading import (
    load_teacher,
    load_teacher_tokenizer,
    read_teacher_config,
    resolve_teacher_dtype,
    shared_vocab_size,
)
from .parsing import given_fields, parse_command

logger = logging.getLogger(__name__)

REPORT_NAME = "lens.json"
LAYER_MAP_FIELDS = ("lens_layer_map", "lens_num_layers", "lens_student_layers", "lens_teacher_layers")


@dataclass
class LensArguments:
    """What ``distillens lens`` profiles against the student (:class:`~distillens_trainer.models.loading.ModelArguments`),
    on which data (read with :class:`~distillens_trainer.data.arguments.PromptFormatArguments`), and where the
    results go."""

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
    teacher_gguf_file: str | None = field(
        default=None,
        metadata={"help": "The teacher's GGUF file inside teacher_model_name_or_path (de-quantised)."},
    )
    max_samples: int = field(default=256, metadata={"help": "Use the first N rows of the data file."})
    max_tokens: int = field(
        default=8192, metadata={"help": "Use at most this many response tokens (the first ones, in order)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Rows per forward pass."})
    token_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens whose per-layer log-probabilities ([layers, tokens, vocab]) are held at once "
            "(default: as many as --lens_memory_mib holds)."
        },
    )
    lens_memory_mib: float = field(
        default=DEFAULT_MEMORY_BUDGET_MIB,
        metadata={
            "help": "Memory (MiB) of the reused per-chunk blocks (fp32 log-probabilities and probabilities of "
            "every layer of both models); sets the chunk size unless --token_chunk_size is given."
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
    lens_layer_map: str | None = field(
        default=None,
        metadata={
            "help": "The training's automatic layer map, marked in the figures: paper = the same relative depth; "
            "shrunk = the teacher block each student block was cut from (students written by 'distillens "
            "shrink'). Default: what the student's distillens_config.json says it was trained with, else paper.",
            "choices": list(LAYER_MAPS),
        },
    )
    lens_num_layers: int | None = field(
        default=None,
        metadata={
            "help": "Layer pairs of the automatic map, marked in the figures (default: as recorded with the "
            "student, else as in training: the paper's 5, fewer for a shallow student)."
        },
    )
    lens_student_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Explicit student layers of the training's layer map (hidden_states)."},
    )
    lens_teacher_layers: list[int] | None = field(
        default=None, metadata={"help": "Explicit teacher layers, one per student layer."}
    )
    device: str | None = field(
        default=None, metadata={"help": "Device, e.g. cuda:0 or cpu (default: cuda if any)."}
    )
    overwrite_output_dir: bool = overwrite_output_dir_field("its lens files are replaced")

    def __post_init__(self) -> None:
        for name in ("max_samples", "max_tokens", "batch_size", "token_chunk_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be at least 1.")
        if not self.lens_memory_mib > 0:
            raise ValueError(f"lens_memory_mib={self.lens_memory_mib} must be > 0 (e.g. 1024).")
        if self.lens_layer_map is not None:  # None: what the student's record says
            check_layer_map_choice(self.lens_layer_map, self.lens_teacher_layers)
        if not self.divergences:
            raise ValueError("divergences is empty: give at least one, e.g. --divergences jsd.")
        for name in self.divergences:
            check_divergence_name(name, "divergences")
        check_temperature_and_beta(1.0, self.jsd_beta)
        if self.teacher_model_name_or_path is None and (
            self.lens_student_layers or self.lens_teacher_layers or self.lens_layer_map
        ):
            raise ValueError(
                "lens_layer_map/lens_student_layers/lens_teacher_layers need --teacher_model_name_or_path."
            )
        if self.teacher_model_name_or_path is None and self.teacher_gguf_file:
            raise ValueError(
                "teacher_gguf_file needs --teacher_model_name_or_path (the folder that holds it)."
            )

    def data_arguments(self, prompt_format: PromptFormatArguments) -> DataArguments:
        """The ``distillens train`` data settings that read ``data_file`` the same way."""
        return DataArguments(
            train_file=self.data_file, max_train_samples=self.max_samples, **dataclasses.asdict(prompt_format)
        )

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def recorded_layer_map_settings(model_name_or_path: str | None) -> dict[str, Any] | None:
    """The layer-map fields (:data:`LAYER_MAP_FIELDS`) ``distillens train`` recorded in the student's folder
    (``distillens_config.json``; for a ``checkpoint-*`` folder, its run's), when that training used the layer map
    (``lens_weight`` or ``feature_weight`` > 0); None otherwise (no record, unreadable, or no lens)."""
    if not model_name_or_path:
        return None
    folder = Path(model_name_or_path)
    for candidate in (folder, folder.parent if folder.name.startswith("checkpoint-") else None):
        path = candidate / RESOLVED_CONFIG_NAME if candidate is not None else None
        if path is None or not path.is_file():
            continue
        try:
            training = json.loads(path.read_text(encoding="utf-8")).get("training")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            logger.warning("ignoring the unreadable %s", path)
            return None
        if not isinstance(training, dict):
            return None
        if not (training.get("lens_weight") or 0) > 0 and not (training.get("feature_weight") or 0) > 0:
            return None
        return {name: training.get(name) for name in LAYER_MAP_FIELDS}
    return None


def layer_map_settings(args: LensArguments, model_name_or_path: str | None) -> dict[str, Any]:
    """The layer-map fields to resolve: the flags when any is given, else the student's training record, else
    the training defaults (``paper``, the default number of pairs)."""
    given = {name: getattr(args, name) for name in LAYER_MAP_FIELDS}
    if any(value is not None for value in given.values()):
        return given
    recorded = recorded_layer_map_settings(model_name_or_path)
    if recorded is not None:
        logger.info(
            "layer map as recorded with the student (%s): %s",
            RESOLVED_CONFIG_NAME,
            ", ".join(f"{name}={value}" for name, value in recorded.items() if value is not None),
        )
        return recorded
    return given


def mapped_layer_pairs(
    args: LensArguments, student: torch.nn.Module, teacher_num_layers: int, model_name_or_path: str | None
) -> list[LayerPair]:
    """The training's layer map, resolved by :func:`~distillens_trainer.loss.layer_map.resolve_layer_map` as
    ``distillens train`` resolves it, from :func:`layer_map_settings`; none for a one-block student without
    explicit layers (it has no intermediate layer)."""
    settings = layer_map_settings(args, model_name_or_path)
    student_num_layers = num_hidden_layers(student)
    if (
        settings["lens_student_layers"] is None
        and settings["lens_num_layers"] is None
        and student_num_layers < 2
    ):
        return []
    return resolve_layer_map(
        student_num_layers,
        teacher_num_layers,
        settings["lens_student_layers"],
        settings["lens_teacher_layers"],
        settings["lens_num_layers"],
        kept_layers=shrunk_kept_layers(student.config, settings["lens_layer_map"] or "paper"),
    )


def _load_models(
    model_args: ModelArguments, args: LensArguments, tokenizer: Any
) -> tuple[torch.nn.Module, torch.nn.Module | None, int]:
    """Student, teacher (or None, in the student's ``dtype``) on the device, frozen, and their shared vocabulary."""
    device = args.resolved_device()
    student = freeze(load_student(model_args)).to(device)
    if args.teacher_model_name_or_path is None:
        return student, None, shared_vocab_size(student, student, tokenizer, tokenizer)
    teacher = load_teacher(
        args.teacher_model_name_or_path,
        resolve_teacher_dtype(model_args.dtype),
        gguf_file=args.teacher_gguf_file,
        trust_remote_code=model_args.trust_remote_code,
    )
    teacher = freeze(teacher).to(device)
    teacher_tokenizer = load_teacher_tokenizer(args.teacher_model_name_or_path, args.teacher_gguf_file)
    return student, teacher, shared_vocab_size(student, teacher, tokenizer, teacher_tokenizer)


def check_lengths_before_loading(
    model_args: ModelArguments, prompt_format: PromptFormatArguments, args: LensArguments
) -> None:
    """``--max_length`` must fit the student's and the teacher's context, read from their configs (no weights)."""
    configs = {
        "student": read_config(
            model_args.model_name_or_path,
            model_args.gguf_file,
            trust_remote_code=model_args.trust_remote_code,
        ),
        "teacher": read_teacher_config(
            args.teacher_model_name_or_path,
            args.teacher_gguf_file,
            trust_remote_code=model_args.trust_remote_code,
        ),
    }
    check_fits_contexts(
        prompt_format.max_length,
        configs,
        setting="--max_length",
        fix="pass --max_length {limit} or less (and --max_prompt_length below it)",
    )


def run_lens(
    model_args: ModelArguments, prompt_format: PromptFormatArguments, args: LensArguments
) -> dict[str, Any]:
    """Profile, write ``lens.json`` and the figures; returns the report (with ``figures`` added)."""
    check_output_dir(
        args.output_dir,
        allowed=args.overwrite_output_dir,
        how_to_allow="pass --overwrite_output_dir true to replace its lens files",
    )
    check_lengths_before_loading(model_args, prompt_format, args)
    tokenizer = load_student_tokenizer(model_args)
    dataset, _ = build_datasets(args.data_arguments(prompt_format), tokenizer)
    student, teacher, vocab_size = _load_models(model_args, args, tokenizer)
    mapped = (
        mapped_layer_pairs(args, student, num_hidden_layers(teacher), model_args.model_name_or_path)
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
        memory_budget_mib=args.lens_memory_mib,
        student_name=Path(model_args.gguf_file or model_args.model_name_or_path).name
        or model_args.model_name_or_path,
        teacher_name=Path(args.teacher_gguf_file or args.teacher_model_name_or_path or "teacher").name,
    )
    report["settings"] = (
        dataclasses.asdict(model_args) | dataclasses.asdict(prompt_format) | dataclasses.asdict(args)
    )
    output_dir = Path(args.output_dir)
    written, replaced = finite_or_null(report)
    if replaced:
        logger.warning(
            "%d values of %s are not finite (NaN or inf: the models' outputs are) and are written as null.",
            replaced,
            REPORT_NAME,
        )
    write_json_atomic(output_dir / REPORT_NAME, written, allow_nan=False)
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


def main(argv: Sequence[str]) -> int:
    """``distillens lens [CONFIG] --model_name_or_path S --teacher_model_name_or_path T --data_file F ...``."""
    model_args, prompt_format, lens_args = parse_command(
        (ModelArguments, PromptFormatArguments, LensArguments), argv, "distillens lens"
    )
    prompt_format.prompt_template = choose_prompt_template(
        prompt_format.prompt_template if "prompt_template" in given_fields(argv) else None,
        [("student", model_args.model_name_or_path), ("teacher", lens_args.teacher_model_name_or_path)],
        load_tokenizer=lambda: load_student_tokenizer(model_args),  # read only when nothing else decides it
    )
    with writing_into(lens_args.output_dir):
        report = run_lens(model_args, prompt_format, lens_args)
    print("\n".join(summary_lines(report)))
    return 0
