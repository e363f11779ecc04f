"""The file runner behind ``distillens eval``: generate and score every file, write the report."""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data.prompts import build_prompt
from ..files import check_output_dir, write_text_atomic
from ..models.facts import check_fits_context
from .arguments import EvalArguments
from .examples import load_eval_examples, references_of, unique_file_names
from .generation import GenerationSettings, generate_responses
from .metrics import EXACT_MATCH_DESCRIPTION, ROUGE_DESCRIPTION, mean_and_std, score_responses

if TYPE_CHECKING:
    from ..models.loading import ModelArguments

logger = logging.getLogger(__name__)

REPORT_FILENAME = "report.json"
GENERATIONS_SUFFIX = ".generations.jsonl"


def refuse_existing_report(args: EvalArguments) -> None:
    """Refuse to replace an existing report unless `overwrite_output_dir` is set."""
    check_output_dir(
        args.output_dir,
        allowed=args.overwrite_output_dir or not (Path(args.output_dir) / REPORT_FILENAME).exists(),
        how_to_allow=f"it holds {REPORT_FILENAME}; pass --overwrite_output_dir to replace it",
    )


def protocol_of(
    model_args: ModelArguments, args: EvalArguments, settings: GenerationSettings
) -> dict[str, Any]:
    """The generation and scoring settings recorded in the report (with the model's dtype)."""
    return {
        "do_sample": settings.do_sample,
        "temperature": settings.temperature if settings.do_sample else None,
        "top_p": settings.top_p if settings.do_sample else None,
        "top_k": settings.top_k if settings.do_sample else None,
        "no_repeat_ngram_size": settings.no_repeat_ngram_size,
        "max_new_tokens": settings.max_new_tokens,
        "max_prompt_length": settings.max_prompt_length,
        "prompt_truncation": "left",
        "seeds": args.effective_seeds(settings),
        "batch_size": settings.batch_size,
        "prompt_template": args.prompt_template,
        "max_eval_samples": args.max_eval_samples,
        "dtype": model_args.dtype,
        "rougeL": ROUGE_DESCRIPTION,
        "exact_match": EXACT_MATCH_DESCRIPTION,
        "std": "population standard deviation over seeds",
    }


def _summary(per_seed: list[float]) -> dict[str, Any]:
    """The {mean, std, per_seed} block of the report."""
    mean, std = mean_and_std(per_seed)
    return {"mean": mean, "std": std, "per_seed": per_seed}


def evaluate_file(
    model: Any, tokenizer: Any, args: EvalArguments, settings: GenerationSettings, path: str, name: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate with `settings` and score one eval file for every seed; returns (report entry, generation
    records)."""
    examples = load_eval_examples(path, args.max_eval_samples)
    prompts = [build_prompt(example, tokenizer, args.prompt_template) for example in examples]
    references = [references_of(example) for example in examples]
    records: list[dict[str, Any]] = []
    per_seed: dict[str, list[float]] = {"rougeL": [], "exact_match": []}
    for seed in args.effective_seeds(settings):
        responses = generate_responses(model, tokenizer, prompts, settings, seed=seed)
        scores = score_responses(responses, references)
        for metric, values in per_seed.items():
            values.append(statistics.fmean(score[metric] for score in scores))
        for example, prompt, refs, response, score in zip(examples, prompts, references, responses, scores):
            records.append(
                {
                    "instruction": example["instruction"],
                    "input": example.get("input") or "",
                    "prompt": prompt,
                    "references": refs,
                    "seed": seed,
                    "generation": response,
                    **score,
                }
            )
        logger.info("%s seed %d: rougeL %.2f", name, seed, per_seed["rougeL"][-1])
    entry = {
        "file": str(path),
        "name": name,
        "num_examples": len(examples),
        "rougeL": _summary(per_seed["rougeL"]),
        "exact_match": _summary(per_seed["exact_match"]),
    }
    return entry, records


def evaluate_files(
    model: Any,
    tokenizer: Any,
    model_args: ModelArguments,
    args: EvalArguments,
    settings: GenerationSettings,
) -> dict[str, Any]:
    """Evaluate `model` (loaded as `model_args` says) on every file of `args.eval_files`, generating with
    `settings`; write the report and generations.

    Writes `<output_dir>/<name>.generations.jsonl` after each file (one line per example per seed)
    and `<output_dir>/report.json` at the end, both atomically. Returns the report dict.
    """
    refuse_existing_report(args)
    names = unique_file_names(args.eval_files)
    for path in args.eval_files:  # fail on a bad file before spending time on generation
        load_eval_examples(path, args.max_eval_samples)
    output_dir = Path(args.output_dir)
    results = []
    for path, name in zip(args.eval_files, names):
        entry, records = evaluate_file(model, tokenizer, args, settings, path, name)
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        write_text_atomic(output_dir / f"{name}{GENERATIONS_SUFFIX}", lines)
        results.append(entry)
    report = {
        "model": model_args.model_name_or_path,
        "protocol": protocol_of(model_args, args, settings),
        "results": results,
    }
    write_text_atomic(output_dir / REPORT_FILENAME, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def run_evaluation(
    model_args: ModelArguments,
    args: EvalArguments,
    settings: GenerationSettings,
    choose_prompt_format: Callable[..., str] | None = None,
) -> dict[str, Any]:
    """Load the model and tokenizer as `model_args` says, evaluate every file of `args` generating with
    `settings`, return the report.

    The model is loaded like a student (:func:`~distillens_trainer.models.loading.load_student`: dtype, GGUF file,
    attn_implementation, trust_remote_code). Runs in a single process on the first CUDA device when one is
    available, else on the CPU. ``choose_prompt_format(tokenizer=...)``, when given, sets ``args.prompt_template``
    once the tokenizer has loaded (:func:`~distillens_trainer.models.info.choose_prompt_template`'s rule).
    """
    refuse_existing_report(args)
    from ..models.loading import load_student, load_student_tokenizer, read_config

    check_fits_context(  # before any weights are read
        settings.max_prompt_length + settings.max_new_tokens,
        read_config(
            model_args.model_name_or_path,
            model_args.gguf_file,
            trust_remote_code=model_args.trust_remote_code,
        ),
        model="model",
        setting=f"--max_prompt_length {settings.max_prompt_length} + --max_new_tokens {settings.max_new_tokens}",
        fix="pass a --max_prompt_length and --max_new_tokens that sum to at most {limit}",
    )
    tokenizer = load_student_tokenizer(model_args)
    if choose_prompt_format is not None:
        args.prompt_template = choose_prompt_format(tokenizer=tokenizer)
    model = load_student(model_args)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    check_finite_weights(model, model_args.model_name_or_path)
    return evaluate_files(model, tokenizer, model_args, args, settings)


def first_non_finite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first parameter of `model` holding a NaN or an infinity, or None."""
    with torch.no_grad():
        return next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)


def check_finite_weights(model: torch.nn.Module, name_or_path: str) -> None:
    """ValueError (one line) for a model with non-finite weights, which cannot generate anything meaningful."""
    bad = first_non_finite_parameter(model)
    if bad is not None:
        raise ValueError(
            f"model_name_or_path={name_or_path!r} holds non-finite weights (NaN or inf in {bad}), so it cannot "
            "be evaluated: evaluate a model saved before training diverged (an earlier checkpoint)."
        )


def output_summary(args: EvalArguments, report: dict[str, Any]) -> str:
    """The last line of ``distillens eval``: where the report and the generations went."""
    names = ",".join(result["name"] for result in report["results"])
    generations = f"{{{names}}}" if len(report["results"]) > 1 else names
    return (
        f"distillens eval: report in {Path(args.output_dir) / REPORT_FILENAME}, generations in "
        f"{Path(args.output_dir) / generations}{GENERATIONS_SUFFIX} (prompt format {args.prompt_template!r})."
    )
