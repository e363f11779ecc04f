""":func:`run_demo`: the whole ``distillens demo`` run, its comparison table and the files it writes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers

from distillens_trainer.files import check_output_dir, write_json_atomic, write_text_atomic
from distillens_trainer.models.info import MODEL_INFO_NAME

from .arguments import (
    BENCHMARK_EXACT_MATCH_RANGES,
    BENCHMARK_SEEDS,
    DEMO_MARKER_NAME,
    FIGURE_NAMES,
    INIT_NAME,
    METHOD_DESCRIPTIONS,
    RESULTS_NAME,
    SMOKE_NOTE,
    DemoArguments,
)
from .data.suite import default_max_new_tokens
from .models.cached import get_student_init, get_teacher
from .models.store import store_model
from .models.training import TrainingRun, count_parameters, train_student
from .report.plots import plot_lens_divergence, plot_per_task, plot_training_curves
from .report.scoring import evaluate_generation, lens_divergence_profile

logger = logging.getLogger(__name__)


def configure_logging() -> None:
    """INFO lines for this package when nobody configured logging (a CLI run); quiet library chatter."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for package in ("distillens_demo", "distillens_trainer"):
        logging.getLogger(package).setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score's "Using default tokenizer."
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()  # one bar per tiny map() is noise; the training/generation bars stay
    if not sys.stderr.isatty():  # a log file: no bars at all (training logs a line per quarter instead)
        transformers.utils.logging.disable_progress_bar()


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


def check_demo_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse a non-empty output_dir, unless it is an earlier demo's (it holds the marker file) or overwriting
    was asked for."""
    earlier_demo = (Path(output_dir) / DEMO_MARKER_NAME).is_file()
    check_output_dir(
        output_dir,
        allowed=overwrite or earlier_demo,
        how_to_allow="pass --overwrite_output_dir to write into it anyway",
    )


def _claim_output_dir(output_dir: Path) -> None:
    """Mark ``output_dir`` as the demo's and drop an earlier demo's results, models and generations from it."""
    if (output_dir / DEMO_MARKER_NAME).is_file():
        (output_dir / RESULTS_NAME).unlink(
            missing_ok=True
        )  # first: a half-replaced folder never looks complete
        for folder in ("models", "generations"):
            shutil.rmtree(output_dir / folder, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        output_dir / DEMO_MARKER_NAME, "Written by distillens demo; a later demo may replace it.\n"
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
    entry.update({key: value for key, value in run.items() if key not in ("log_history", "key")})
    return entry


def _run_record(run: TrainingRun, path: str | None) -> dict[str, Any]:
    """A student's run as ``results.json`` records it, with the folder its model was saved to."""
    return run.summary() | ({"path": path} if path is not None else {})


def _reading_notes(args: DemoArguments, models: Mapping[str, Any]) -> list[str]:
    """What the table can and cannot tell: the smoke preset's purpose, or the benchmark's ranges over seeds
    and what varies between machines."""
    if args.preset == "smoke":
        return [SMOKE_NOTE]
    if not args.is_benchmarked():
        return ["One seed is one draw: repeat over seeds with benchmarks/quality.py before reading a gap."]
    names = ["teacher", INIT_NAME, *(name for name in models if name in BENCHMARK_EXACT_MATCH_RANGES)]
    ranges = ", ".join(
        f"{name} {low:.1f}" if low == high else f"{name} {low:.1f}-{high:.1f}"
        for name in dict.fromkeys(names)
        for low, high in [BENCHMARK_EXACT_MATCH_RANGES[name]]
    )
    return [
        f"Exact match over {BENCHMARK_SEEDS} student seeds on the machine that wrote "
        f"benchmarks/results/quality.json: {ranges}.",
        "The numbers change with the machine (float kernels, CPU type, torch build, threads): another machine of "
        "the same kind gave teacher 84.5, init 42.5, sft 69.0. On every benchmarked seed the teacher led, every "
        "method improved on init, and distillens had the lowest lens JSD to the teacher; whether kd or "
        "distillens answers more prompts changes from seed to seed.",
    ]


def _write_generations(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def output_summary(args: DemoArguments, results: Mapping[str, Any]) -> str:
    """The last line of ``distillens demo``: where the models, their prompt format and the metrics went."""
    output_dir = Path(args.output_dir)
    names = ",".join(Path(path).name for path in results["model_dirs"].values())
    models = (
        f"models in {output_dir / 'models'}/{{{names}}} (prompt format {args.prompt_template!r}, recorded in "
        f"{MODEL_INFO_NAME})"
        if names
        else "no models saved (--save_models false)"
    )
    return (
        f"distillens demo: {models}, metrics in {output_dir / RESULTS_NAME}, figures and generations in "
        f"{output_dir}, teacher cache in {args.resolved_cache_dir}."
    )


def run_demo(args: DemoArguments) -> dict[str, Any]:
    """Run the whole demo (see the module docstring) and return what ``results.json`` holds."""
    check_demo_output_dir(args.output_dir, args.overwrite_output_dir)
    configure_logging()
    start = time.perf_counter()
    timings: dict[str, float] = {}
    output_dir = Path(args.output_dir)
    _claim_output_dir(output_dir)
    with tempfile.TemporaryDirectory(prefix="distillens-demo-") as scratch:
        return _run(args, output_dir, Path(scratch), start, timings)


def _save(model: Any, tokenizer: Any, folder: Path, args: DemoArguments) -> str:
    store_model(folder, model, tokenizer, None, prompt_template=args.prompt_template)
    return str(folder)


def _run(
    args: DemoArguments, output_dir: Path, scratch: Path, start: float, timings: dict[str, float]
) -> dict[str, Any]:
    """The demo's steps; the trainers write into ``scratch``, the saved models go to ``output_dir/models``."""
    threads = set_threads(args.num_threads)
    logger.info(
        "[demo] preset %r, %d torch threads, output in %s, cache in %s",
        args.preset,
        threads,
        output_dir,
        args.resolved_cache_dir,
    )

    with _phase("task suite and teacher (cached, or SFT from scratch)", timings):
        teacher, suite, teacher_info = get_teacher(args, output_dir / "data", scratch)
    tokenizer = suite.tokenizer
    with _phase(f"initial student ({args.student_warmup_steps} SFT warm-up steps, cached)", timings):
        initial_student, init_info = get_student_init(args, suite, scratch)
    model_dirs: dict[str, str] = {}
    if args.save_models:
        model_dirs["teacher"] = _save(teacher, tokenizer, output_dir / "models" / "teacher", args)
        model_dirs[INIT_NAME] = _save(initial_student, tokenizer, output_dir / "models" / INIT_NAME, args)

    runs: dict[str, TrainingRun] = {}
    students: dict[str, torch.nn.Module] = {}
    for method in args.methods:
        with _phase(f"student '{method}'", timings):
            student, run = train_student(method, initial_student, teacher, suite, args, scratch / method)
            if args.save_models:
                model_dirs[method] = _save(student, tokenizer, output_dir / "models" / method, args)
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
            **_model_entry(
                students[method], evaluations[method], _run_record(runs[method], model_dirs.get(method))
            ),
            "description": METHOD_DESCRIPTIONS[method],
            "lens_profile": profiles[method],
        }
    student_init = {
        **_model_entry(initial_student, evaluations[INIT_NAME], init_info),
        "max_steps": args.student_warmup_steps,
        "description": METHOD_DESCRIPTIONS[INIT_NAME],
        "lens_profile": profiles[INIT_NAME],
    }

    lens_layers = next((run.layer_map for run in runs.values() if run.layer_map), [])
    curves_name, lens_name, per_task_name = FIGURE_NAMES
    student_layers = [s for s, _ in lens_layers]
    figures: dict[str, str] = {}
    with _phase("figures", timings):
        for name, plotted in (
            (curves_name, plot_training_curves(runs, output_dir / curves_name)),
            (lens_name, plot_lens_divergence(profiles, student_layers, output_dir / lens_name)),
            (per_task_name, plot_per_task(evaluations, output_dir / per_task_name)),
        ):
            if plotted is not None:
                figures[name] = str(plotted)

    table = format_table({"teacher": models["teacher"], INIT_NAME: student_init} | models)
    results = {
        "preset": args.preset,
        "teacher_cached": bool(teacher_info["cached"]),
        "teacher_path": teacher_info["path"],
        "student_init_cached": bool(init_info["cached"]),
        "model_dirs": model_dirs,
        "prompt_template": args.prompt_template,
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
    histories = {name: run.log_history for name, run in runs.items()}
    write_json_atomic(output_dir / "training_logs.json", histories)
    print(f"\nDistillLens demo ({args.preset} preset), test split of {len(suite.splits['test'])} prompts:\n")
    print(table)
    print()
    for line in _reading_notes(args, models):
        print(line)
    cached = "cached" if results["teacher_cached"] else "trained"
    print(f"Total time {results['total_time_s']:.0f} s (teacher {cached}).")
    return results
