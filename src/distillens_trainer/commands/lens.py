"""``distillens lens``: the logit-lens profile of a student (against a teacher, or alone) on a data file.

Writes ``lens.json`` (schema in :mod:`distillens_trainer.diagnostics.report`) and PNG figures to
``--output_dir``. Data are read and tokenised exactly as ``distillens train`` does (same prompt templates
and columns); models are loaded as ``distillens train`` loads its student and teacher.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.arguments import PromptFormatArguments
from ..data.building import build_datasets
from ..diagnostics.arguments import LensArguments
from ..diagnostics.figures import write_figures
from ..diagnostics.profiled_models import (
    check_lengths_before_loading,
    load_profiled_models,
    mapped_layer_pairs,
)
from ..diagnostics.report import finite_or_null, profile_models
from ..files import check_output_dir, write_json_atomic, writing_into
from ..models.facts import num_hidden_layers
from ..models.info import choose_prompt_template
from ..models.loading import ModelArguments, load_student_tokenizer
from .parsing import given_fields, parse_command

logger = logging.getLogger(__name__)

REPORT_NAME = "lens.json"


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
    student, teacher, vocab_size = load_profiled_models(model_args, args, tokenizer)
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
        compile=args.compile(),
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
