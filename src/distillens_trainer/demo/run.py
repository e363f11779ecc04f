""":func:`run_demo`: the whole ``distillens demo`` run, its comparison table and the files it writes."""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..files import refuse_non_empty_dir, write_json_atomic, write_text_atomic
from .arguments import INIT_NAME, METHOD_DESCRIPTIONS, RESULTS_NAME, DemoArguments
from .cache import get_student_init, get_teacher
from .plots import plot_lens_divergence, plot_per_task, plot_training_curves
from .scoring import default_max_new_tokens, evaluate_generation, lens_divergence_profile
from .training import count_parameters, train_student

logger = logging.getLogger(__name__)


def configure_logging() -> None:
    """INFO lines for this package when nobody configured logging (a CLI run); quiet library chatter."""
    import datasets
    import transformers

    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("distillens_trainer").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score's "Using default tokenizer."
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()  # one bar per tiny map() is noise; the training/generation bars stay


def set_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads (default: the usable cores, at most 8) and return the number."""
    if num_threads is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        num_threads = max(1, min(cores, 8))
    torch.set_num_threads(num_threads)
    return num_threads


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse a non-empty output_dir unless overwriting was asked for."""
    refuse_non_empty_dir(
        output_dir, allowed=overwrite, how_to_allow="pass --overwrite_output_dir to write into it anyway"
    )


@contextmanager
def _phase(name: str, timings: dict[str, float]) -> Iterator[None]:
    logger.info("[demo] %s ...", name)
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 2)
    logger.info("[demo] %s done in %.1f s", name, timings[name])


def format_table(models: Mapping[str, Mapping[str, Any]]) -> str:
    """The comparison table printed at the end of the demo (Markdown)."""
    header = "| model | params | layers x hidden | steps | train s | exact match | ROUGE-L | mean lens JSD | output JSD |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, entry in models.items():
        profile = entry.get("lens_profile")
        mean_jsd = f"{statistics.fmean(profile['divergence']):.4f}" if profile else "-"
        final_jsd = f"{profile['final']:.4f}" if profile else "-"
        train_time = "cached" if entry.get("cached") else f"{entry.get('train_time_s', 0):.0f}"
        lines.append(
            f"| {name} | {entry['params'] / 1e6:.2f}M | {entry['num_layers']} x {entry['hidden_size']} | "
            f"{entry['max_steps']} | {train_time} | {entry['exact_match']:.1f} | {entry['rougeL']:.1f} | "
            f"{mean_jsd} | {final_jsd} |"
        )
    return "\n".join(lines)


def _model_entry(model: Any, evaluation: Mapping[str, Any], run: Mapping[str, Any]) -> dict[str, Any]:
    config = model.config
    entry = {
        "exact_match": evaluation["exact_match"],
        "rougeL": evaluation["rougeL"],
        "per_task": evaluation["per_task"],
        "params": count_parameters(model),
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
    }
    entry.update({key: value for key, value in run.items() if key not in ("trainer", "log_history", "key")})
    return entry


def _write_generations(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def run_demo(args: DemoArguments) -> dict[str, Any]:
    """Run the whole demo (see the module docstring) and return what ``results.json`` holds."""
    check_output_dir(args.output_dir, args.overwrite_output_dir)
    configure_logging()
    start = time.perf_counter()
    timings: dict[str, float] = {}
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    threads = set_threads(args.num_threads)
    logger.info(
        "[demo] preset %r, %d torch threads, output in %s, cache in %s",
        args.preset,
        threads,
        output_dir,
        args.resolved_cache_dir,
    )

    with _phase("task suite and teacher (cached, or SFT from scratch)", timings):
        teacher, suite, teacher_info = get_teacher(args, output_dir / "data", output_dir / "models")
    tokenizer = suite.tokenizer
    with _phase(f"initial student ({args.student_warmup_steps} SFT warm-up steps, cached)", timings):
        initial_student, init_info = get_student_init(args, suite, output_dir / "models")

    runs: dict[str, dict[str, Any]] = {}
    students: dict[str, torch.nn.Module] = {}
    for method in args.methods:
        with _phase(f"student '{method}'", timings):
            student, run = train_student(
                method, initial_student, teacher, suite, args, output_dir / "models" / method
            )
            if args.save_models:
                run["trainer"].save_model(str(output_dir / "models" / method))
                run["path"] = str(output_dir / "models" / method)
            students[method], runs[method] = student, run

    max_new_tokens = args.max_new_tokens or default_max_new_tokens(suite.splits["test"], tokenizer)
    evaluated = {"teacher": teacher, INIT_NAME: initial_student, **students}
    evaluations: dict[str, dict[str, Any]] = {}
    with _phase(
        f"greedy generation on {len(suite.splits['test'])} test prompts, {len(evaluated)} models", timings
    ):
        for name, model in evaluated.items():
            evaluations[name] = evaluate_generation(
                model,
                tokenizer,
                suite.splits["test"],
                prompt_template=args.prompt_template,
                batch_size=args.eval_batch_size,
                max_new_tokens=max_new_tokens,
            )
            _write_generations(output_dir / "generations" / f"{name}.jsonl", evaluations[name]["records"])

    profiles: dict[str, dict[str, Any]] = {}
    with _phase("per-layer logit-lens divergence on the validation split", timings):
        for name, model in evaluated.items():
            if name != "teacher":
                profiles[name] = lens_divergence_profile(
                    model, teacher, tokenizer, suite.eval_dataset, batch_size=args.eval_batch_size
                )

    models: dict[str, dict[str, Any]] = {
        "teacher": {
            **_model_entry(teacher, evaluations["teacher"], teacher_info),
            "description": METHOD_DESCRIPTIONS["teacher"],
        }
    }
    for method in students:
        models[method] = {
            **_model_entry(students[method], evaluations[method], runs[method]),
            "description": METHOD_DESCRIPTIONS[method],
            "lens_profile": profiles[method],
        }
    student_init = {
        **_model_entry(initial_student, evaluations[INIT_NAME], init_info),
        "max_steps": args.student_warmup_steps,
        "description": METHOD_DESCRIPTIONS[INIT_NAME],
        "lens_profile": profiles[INIT_NAME],
    }

    lens_layers = next((run["layer_map"] for run in runs.values() if run["layer_map"]), [])
    figures: dict[str, str] = {}
    with _phase("figures", timings):
        for name, plotted in (
            ("training_curves.png", plot_training_curves(runs, output_dir / "training_curves.png")),
            (
                "lens_divergence.png",
                plot_lens_divergence(
                    profiles, [s for s, _ in lens_layers], output_dir / "lens_divergence.png"
                ),
            ),
            ("exact_match_per_task.png", plot_per_task(evaluations, output_dir / "exact_match_per_task.png")),
        ):
            if plotted is not None:
                figures[name] = str(plotted)

    table = format_table({"teacher": models["teacher"], INIT_NAME: student_init} | models)
    results = {
        "preset": args.preset,
        "teacher_cached": bool(teacher_info["cached"]),
        "teacher_path": teacher_info["path"],
        "student_init_cached": bool(init_info["cached"]),
        "torch_threads": threads,
        "max_new_tokens": max_new_tokens,
        "lens_layer_map": lens_layers,
        "models": models,
        "student_init": student_init,
        "figures": figures,
        "timings_s": timings,
        "total_time_s": round(time.perf_counter() - start, 2),
        "settings": args.settings(),
        "table": table,
    }
    write_json_atomic(output_dir / RESULTS_NAME, results)
    histories = {name: run["log_history"] for name, run in runs.items()}
    write_json_atomic(output_dir / "training_logs.json", histories)
    print(f"\nDistillLens demo ({args.preset} preset), test split of {len(suite.splits['test'])} prompts:\n")
    print(table)
    print(f"\nResults: {output_dir / RESULTS_NAME}; figures: {', '.join(figures) or 'none'}")
    cached = "cached" if results["teacher_cached"] else "trained"
    print(f"Total time {results['total_time_s']:.0f} s (teacher {cached}).")
    return results
