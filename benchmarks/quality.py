"""Distillation-quality benchmark: the demo's comparison repeated over seeds, with more baselines.

One cached SFT teacher (the same one ``distillens demo`` trains for the same settings), then, for every seed,
one student initialisation distilled with every method from that same initialisation and data order:

- ``sft``: cross-entropy only;
- ``kd``: reverse KL on the final logits only;
- ``distillens``: reverse KL + Jensen-Shannon logit lens (the paper's defaults);
- ``distillens_skl``: reverse KL + symmetric-KL logit lens;
- ``feature``: reverse KL + the paper's MSE feature baseline (learned projection of teacher hidden states);
- ``kd_onpolicy`` / ``distillens_onpolicy``: ``kd`` / ``distillens`` on completions the student samples for the
  training prompts (``lmbda=1``, GKD-style), at most the longest training answer plus 4 tokens each;
- ``kd_mixed`` / ``distillens_mixed``: the same with half of the optimizer windows on-policy (``lmbda=0.5``);
- ``distillens_hidden``: ``distillens`` from an fp32 teacher cache of the teacher's hidden states (no teacher
  model while training; the same student as ``distillens`` up to float rounding);
- ``distillens_topk8`` / ``distillens_topk32`` / ``distillens_topk128``: ``distillens`` from a bf16 teacher cache
  of the teacher's top-k log-probabilities (k = 8, 32, 128) per response token and lens layer: what top-k costs.

The default run is the five off-policy methods; the on-policy ones are opt-in with ``--methods`` (they sample
completions every step, which makes their runs several times longer), and so are the cache methods (each builds
its teacher cache once, in ``--cache_dir`` beside the teacher, at its first seed; ``train s`` excludes the build).

Every student is scored with greedy exact match and ROUGE-L on the test split, and with the per-layer
logit-lens JSD to the teacher on the validation split. The report gives mean ± sample std over seeds per
method, and paired per-seed differences (same initialisation, same data order) with a 95% t interval. An
on-policy run also records its share of on-policy windows and its mean sampled completion length.

Run from the repository root::

    PYTHONPATH=src python benchmarks/quality.py                      # default preset, seeds 0 1 2, 5 methods
    PYTHONPATH=src python benchmarks/quality.py --seeds 0 1 2 3 4 --student_max_steps 600 --tag long
    PYTHONPATH=src python benchmarks/quality.py --seeds 0 1 2 3 4 --methods kd kd_onpolicy distillens \
        distillens_onpolicy kd_mixed distillens_mixed --num_threads 1 --tag onpolicy   # add --resume after a stop
    PYTHONPATH=src python benchmarks/quality.py --seeds 0 1 2 3 4 --methods distillens distillens_hidden \
        distillens_topk8 distillens_topk32 distillens_topk128 --tag cache   # what a top-k teacher cache costs

Every ``distillens demo`` field is accepted (sizes, steps, tasks, ``--lens_weight``, ``--lens_num_layers``,
...); ``--output_dir`` is where ``quality[_TAG].json`` and ``quality[_TAG].md`` go (default
``benchmarks/results``) and ``--cache_dir`` defaults to ``<tmp>/.distillens-cache``, the folder
``distillens demo --output_dir /tmp/<name>`` uses, so the demo's teacher is reused.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

import distillens_demo as demo
from distillens_demo.models.training import on_policy_means
from distillens_trainer.files import write_json_atomic, write_text_atomic

logger = logging.getLogger("distillens_trainer.benchmarks.quality")

# Every method the benchmark knows (the demo's); a run trains DEFAULT_METHODS unless --methods says otherwise.
ALL_METHODS = (
    "sft", "kd", "distillens", "distillens_skl", "feature",
    "kd_onpolicy", "distillens_onpolicy", "kd_mixed", "distillens_mixed",
    "distillens_hidden", "distillens_topk8", "distillens_topk32", "distillens_topk128",
)  # fmt: skip
DEFAULT_METHODS = ALL_METHODS[:5]  # the off-policy methods: the on-policy ones sample completions every step
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
# (method, baseline) pairs whose per-seed differences are reported when both methods ran, in this order: the first
# reported is the headline (on-policy DistillLens - on-policy KD when both ran, else DistillLens - KD, else the
# first pair that ran: distillens_hidden - distillens in a run of the cache methods).
COMPARISONS = (
    ("distillens_onpolicy", "kd_onpolicy"),
    ("distillens", "kd"),
    ("distillens_skl", "kd"),
    ("feature", "kd"),
    ("kd", "sft"),
    ("distillens", "sft"),
    ("kd_onpolicy", "kd"),
    ("distillens_onpolicy", "distillens"),
    ("distillens_mixed", "kd_mixed"),
    ("kd_mixed", "kd"),
    ("distillens_mixed", "distillens"),
    # the teacher caches: an fp32 hidden cache against the teacher model (float rounding only), then each top-k
    # cache against the hidden one (what keeping k log-probabilities costs)
    ("distillens_hidden", "distillens"),
    ("distillens_topk8", "distillens_hidden"),
    ("distillens_topk32", "distillens_hidden"),
    ("distillens_topk128", "distillens_hidden"),
)
METRICS = ("exact_match", "rougeL")
# Per-run statistics of the methods that sample completions (None for the others), averaged over seeds too.
ON_POLICY_STATS = ("on_policy_fraction", "completion_length")
# Two-sided 95% quantiles t_{0.975, df} of Student's t distribution, used when scipy is not installed.
T_975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
    20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
    29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980,
}  # fmt: skip


@dataclass
class QualityArguments:
    """Benchmark-only settings; the model, data and training settings are ``distillens demo``'s fields."""

    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "Student seeds (initial weights and data order); every method runs once per seed."},
    )
    tag: str | None = field(
        default=None,
        metadata={
            "help": "Suffix of the report files (quality_<tag>.json/.md), to keep extra settings apart."
        },
    )
    render: str | None = field(
        default=None,
        metadata={
            "help": "Path of an existing quality*.json report: rewrite its Markdown table beside it and stop "
            "(no training)."
        },
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue the report quality[_TAG].json an interrupted run left (same settings, seeds and "
            "methods): its finished (method, seed) runs are kept, the others trained. Without the file, a "
            "fresh run."
        },
    )

    def __post_init__(self) -> None:
        if self.render is not None and not Path(self.render).is_file():
            raise ValueError(
                f"render={self.render!r} is not a file: give the path of a quality*.json report."
            )
        if len(self.seeds) < 2:
            raise ValueError(f"seeds={self.seeds} needs at least 2 seeds for a standard deviation.")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} repeats a seed; list each once.")
        if self.tag is not None and not self.tag.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"tag={self.tag!r} may hold only letters, digits, '-' and '_'.")


# --------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: scipy's when installed, else the inline table (the next smaller tabulated df)."""
    try:
        from scipy.stats import t as student_t
    except ImportError:
        return T_975[max(key for key in T_975 if key <= df)]
    return float(student_t.ppf(0.975, df))


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (n-1)."""
    return {
        "mean": round(statistics.fmean(values), 5),
        "std": round(statistics.stdev(values), 5) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def paired_difference(differences: list[float], digits: int = 3) -> dict[str, Any]:
    """Mean paired difference with a two-sided 95% t interval over seeds, rounded to ``digits``."""
    n = len(differences)
    mean = statistics.fmean(differences)
    std = statistics.stdev(differences) if n > 1 else 0.0
    t = t_quantile_975(n - 1)
    half_width = t * std / math.sqrt(n)
    return {
        "per_seed": [round(value, digits) for value in differences],
        "mean": round(mean, digits),
        "std": round(std, digits),
        "t_975": round(t, 4),
        "ci95": [round(mean - half_width, digits), round(mean + half_width, digits)],
        "n": n,
    }


def summarise(runs: list[dict[str, Any]], methods: list[str], seeds: list[int]) -> dict[str, Any]:
    by_key = {(run["method"], run["seed"]): run for run in runs}
    summary: dict[str, Any] = {}
    for method in methods:
        rows = [by_key[(method, seed)] for seed in seeds if (method, seed) in by_key]
        if rows:
            summary[method] = {
                key: mean_std([row[key] for row in rows])
                for key in (*METRICS, "mean_lens_jsd", "output_jsd", "train_time_s")
            }
            for key in ON_POLICY_STATS:  # only for a method whose every run sampled completions
                values = [row.get(key) for row in rows]
                if all(value is not None for value in values):
                    summary[method][key] = mean_std(values)
    comparisons: dict[str, Any] = {}
    for method, baseline in COMPARISONS:
        if method not in methods or baseline not in methods:
            continue
        common = [seed for seed in seeds if (method, seed) in by_key and (baseline, seed) in by_key]
        if len(common) < 2:
            continue
        comparisons[f"{method} - {baseline}"] = {
            metric: paired_difference(
                [by_key[(method, s)][metric] - by_key[(baseline, s)][metric] for s in common]
            )
            for metric in METRICS
        } | {"seeds": common}
    return {"methods": summary, "paired": comparisons}


# --------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------


def _fmt(stat: dict[str, float], digits: int = 1) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown_report(report: dict[str, Any]) -> str:
    settings, summary = report["settings"], report["summary"]
    teacher, threads = report["teacher"], report["torch_threads"]
    student_runs = sum(run["method"] != demo.INIT_NAME for run in report["runs"])
    lines = [
        "# Distillation quality on the built-in task suite",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Seeds {report['seeds']}; {student_runs} student runs in {report['total_time_s'] / 60:.1f} min "
        f"({threads} torch thread{'s' if threads != 1 else ''}). Tasks: {', '.join(settings['tasks'])}. "
        f"Teacher {teacher['num_layers']} x {teacher['hidden_size']} ({teacher['params'] / 1e6:.2f}M params, "
        f"{settings['teacher_max_steps']} SFT steps); students {settings['student_layers']} x "
        f"{settings['student_hidden_size']} ({report['student_params'] / 1e6:.2f}M params, "
        f"{settings['student_warmup_steps']} shared SFT warm-up steps (row `init`), then "
        f"{settings['student_max_steps']} steps per method, batch {settings['batch_size']}, "
        f"lr {settings['student_learning_rate']}). Objectives: KD {settings['kd_divergence']} on the final "
        f"logits; lens weight {settings['lens_weight']}, lens layer pairs (student, teacher) "
        f"{report['lens_layer_map']}. Test split: {settings['num_test']} prompts, greedy decoding; lens JSD "
        f"on the {settings['num_eval']} validation examples.",
        "",
        f"Teacher: exact match {teacher['exact_match']:.1f}, ROUGE-L {teacher['rougeL']:.1f}.",
        "",
    ]
    on_policy = any("completion_length" in stats for stats in summary["methods"].values())
    if on_policy:
        lines[-1:-1] = [
            "",
            "On-policy methods: each optimizer window trains, with probability lmbda, on completions the student "
            f"samples for the window's prompts (temperature 1, untruncated, at most "
            f"{report['completion_max_new_tokens']} tokens: the longest training answer plus 4). Columns "
            "`on-policy` (share of on-policy windows) and `completion tokens` (mean sampled length, EOS included); "
            "`train s` includes the sampling.",
        ]
    extra = " on-policy | completion tokens |" if on_policy else ""
    lines += [
        "| method | exact match | ROUGE-L | mean lens JSD | output JSD | train s |" + extra,
        "|---|---|---|---|---|---|" + ("---|---|" if on_policy else ""),
    ]
    for method, stats in summary["methods"].items():
        row = (
            f"| {method} | {_fmt(stats['exact_match'])} | {_fmt(stats['rougeL'])} | "
            f"{_fmt(stats['mean_lens_jsd'], 4)} | {_fmt(stats['output_jsd'], 4)} | {_fmt(stats['train_time_s'], 0)} |"
        )
        if on_policy:
            row += "".join(
                f" {_fmt(stats[key], digits)} |" if key in stats else " - |"
                for key, digits in zip(ON_POLICY_STATS, (2, 1))
            )
        lines.append(row)
    lines += [
        "",
        "Mean ± sample standard deviation over seeds. Paired differences (same seed = same initial weights and",
        "data order), mean with a two-sided 95% t interval over seeds:",
        "",
        "| difference | exact match | 95% CI | ROUGE-L | 95% CI | per-seed exact match |",
        "|---|---|---|---|---|---|",
    ]
    for name, diff in summary["paired"].items():
        em, rouge = diff["exact_match"], diff["rougeL"]
        lines.append(
            f"| {name} | {em['mean']:+.2f} | [{em['ci95'][0]:+.2f}, {em['ci95'][1]:+.2f}] | {rouge['mean']:+.2f} | "
            f"[{rouge['ci95'][0]:+.2f}, {rouge['ci95'][1]:+.2f}] | {', '.join(f'{v:+.1f}' for v in em['per_seed'])} |"
        )
    lines += ["", "Per run:", "", "| method | seed | exact match | ROUGE-L | mean lens JSD | output JSD |"]
    lines.append("|---|---|---|---|---|---|")
    for run in report["runs"]:
        lines.append(
            f"| {run['method']} | {run['seed']} | {run['exact_match']:.1f} | {run['rougeL']:.1f} | "
            f"{run['mean_lens_jsd']:.4f} | {run['output_jsd']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def render_markdown(json_path: Path) -> str:
    """Rewrite the Markdown report beside a finished JSON report (e.g. after a change of format)."""
    report = json.loads(json_path.read_text(encoding="utf-8"))
    if not report.get("complete"):
        raise ValueError(f"{json_path} is a partial report (complete=false): finish or rerun the benchmark.")
    report["summary"] = summarise(report["runs"], [demo.INIT_NAME, *report["methods"]], report["seeds"])
    write_json_atomic(json_path, report)
    markdown = markdown_report(report)
    write_text_atomic(json_path.with_suffix(".md"), markdown)
    return markdown


# --------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------


def _record(
    method: str, seed: int, evaluation: dict[str, Any], profile: dict[str, Any], run: dict[str, Any]
) -> dict[str, Any]:
    """One (method, seed) row of the report."""
    return {
        "method": method,
        "seed": seed,
        "exact_match": evaluation["exact_match"],
        "rougeL": evaluation["rougeL"],
        "mean_lens_jsd": round(statistics.fmean(profile["divergence"]), 5),
        "output_jsd": profile["final"],
        "lens_jsd": profile["divergence"],
        "student_val_ce": profile["student_ce"],
        "train_time_s": run.get("train_time_s") or 0.0,
        "final_loss": run.get("final_loss"),
        "final_ce_loss": run.get("final_ce_loss"),
        "final_kd_loss": run.get("final_kd_loss"),
        "final_lens_loss": run.get("final_lens_loss"),
        "per_task": {task: value["exact_match"] for task, value in evaluation["per_task"].items()},
        **{key: run.get(key) for key in ON_POLICY_STATS},
    }


def report_paths(bench: QualityArguments, args: demo.DemoArguments) -> tuple[Path, Path]:
    """``quality[_TAG].json`` and ``.md`` in ``args.output_dir``."""
    stem = f"quality_{bench.tag}" if bench.tag else "quality"
    results_dir = Path(args.output_dir)
    return results_dir / f"{stem}.json", results_dir / f"{stem}.md"


def resumable_report(bench: QualityArguments, args: demo.DemoArguments) -> dict[str, Any] | None:
    """With ``--resume``, the report an earlier run of the same benchmark left (None without one); a report of
    other settings, seeds or methods is an error, so runs of different protocols never mix."""
    json_path, _ = report_paths(bench, args)
    if not bench.resume or not json_path.is_file():
        return None
    previous = json.loads(json_path.read_text(encoding="utf-8"))
    mine = {"settings": args.settings(), "seeds": bench.seeds, "methods": args.methods}
    for key, value in mine.items():
        if previous.get(key) != value:
            differing = key
            if key == "settings" and isinstance(previous.get(key), dict):
                names = [name for name in value if previous[key].get(name, object()) != value[name]]
                differing = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") or key
            raise ValueError(
                f"resume: {json_path} was written with other {key} ({differing}); rerun with the same "
                "settings, or drop --resume (the report is then replaced)."
            )
    return previous


def run_quality(
    bench: QualityArguments,
    args: demo.DemoArguments,
    command: str,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and score every (seed, method) student; write and return the report. The runs of ``previous`` (the
    report of an interrupted run, see :func:`resumable_report`) are kept instead of trained again."""
    demo.configure_logging()
    threads = demo.set_threads(args.num_threads)
    start = time.perf_counter()
    json_path, md_path = report_paths(bench, args)
    done = {(run["method"], run["seed"]): run for run in (previous or {}).get("runs", [])}
    elapsed_before = float((previous or {}).get("total_time_s", 0.0)) if done else 0.0
    if done:
        logger.info("[quality] resuming %s: %d finished runs kept", json_path, len(done))
    report: dict[str, Any] = {
        "command": previous["command"] if done else command,
        "seeds": bench.seeds,
        "methods": args.methods,
        "torch_threads": threads,
        "settings": args.settings(),
        "complete": False,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="distillens-quality-") as work_dir:
        work = Path(work_dir)
        teacher, suite, teacher_info = demo.get_teacher(args, work / "data", work / "models")
        tokenizer = suite.tokenizer
        max_new_tokens = args.max_new_tokens or demo.default_max_new_tokens(suite.splits["test"], tokenizer)
        if any(demo.METHODS[method].get("lmbda", 0) > 0 for method in args.methods):
            report["completion_max_new_tokens"] = suite.completion_max_new_tokens
        evaluate = {
            "prompt_template": args.prompt_template,
            "batch_size": args.eval_batch_size,
            "max_new_tokens": max_new_tokens,
        }
        teacher_eval = demo.evaluate_generation(teacher, tokenizer, suite.splits["test"], **evaluate)
        report["teacher"] = {
            "exact_match": teacher_eval["exact_match"],
            "rougeL": teacher_eval["rougeL"],
            "per_task": teacher_eval["per_task"],
            "params": demo.count_parameters(teacher),
            "num_layers": teacher.config.num_hidden_layers,
            "hidden_size": teacher.config.hidden_size,
            "cached": teacher_info["cached"],
            "path": teacher_info["path"],
        }
        logger.info(
            "[quality] teacher: exact match %.1f, ROUGE-L %.1f",
            teacher_eval["exact_match"],
            teacher_eval["rougeL"],
        )
        if previous and previous.get("lens_layer_map"):
            report["lens_layer_map"] = previous["lens_layer_map"]
        for seed in bench.seeds:
            initial, init_info = demo.get_student_init(args, suite, work, seed=seed)
            report["student_params"] = demo.count_parameters(initial)
            if (demo.INIT_NAME, seed) in done:
                report["runs"].append(done[(demo.INIT_NAME, seed)])
            else:
                init_eval = demo.evaluate_generation(initial, tokenizer, suite.splits["test"], **evaluate)
                init_profile = demo.lens_divergence_profile(
                    initial, teacher, tokenizer, suite.eval_dataset, batch_size=args.eval_batch_size
                )
                report["runs"].append(
                    _record(
                        demo.INIT_NAME,
                        seed,
                        init_eval,
                        init_profile,
                        {"train_time_s": init_info.get("train_time_s")},
                    )
                )
            for method in args.methods:
                if (method, seed) in done:
                    logger.info("[quality] seed %d, method %s: kept from the earlier run", seed, method)
                    report["runs"].append(done[(method, seed)])
                    continue
                logger.info("[quality] seed %d, method %s", seed, method)
                student, run = demo.train_student(
                    method, initial, teacher, suite, args, work / f"{method}-{seed}", seed=seed
                )
                evaluation = demo.evaluate_generation(student, tokenizer, suite.splits["test"], **evaluate)
                profile = demo.lens_divergence_profile(
                    student, teacher, tokenizer, suite.eval_dataset, batch_size=args.eval_batch_size
                )
                if run.layer_map:
                    report["lens_layer_map"] = run.layer_map
                record = _record(
                    method, seed, evaluation, profile, run.summary() | on_policy_means(run.log_history)
                )
                report["runs"].append(record)
                logger.info(
                    "[quality] seed %d %s: exact match %.1f, ROUGE-L %.1f, mean lens JSD %.4f (%.0f s)",
                    seed,
                    method,
                    record["exact_match"],
                    record["rougeL"],
                    record["mean_lens_jsd"],
                    record["train_time_s"],
                )
                report["total_time_s"] = round(elapsed_before + time.perf_counter() - start, 1)
                # partial results, for polling and --resume: the finished runs, then those of the earlier run
                partial = {**report, "runs": report["runs"] + _pending(done, report["runs"])}
                write_json_atomic(json_path, partial)
    report.setdefault("lens_layer_map", [])
    report["summary"] = summarise(report["runs"], [demo.INIT_NAME, *args.methods], bench.seeds)
    report["complete"] = True
    report["total_time_s"] = round(elapsed_before + time.perf_counter() - start, 1)
    write_json_atomic(json_path, report)
    markdown = markdown_report(report)
    write_text_atomic(md_path, markdown)
    print(markdown)
    return report


def _pending(done: dict[tuple[str, int], dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The earlier run's records not yet placed in ``runs`` (kept in a partial report so a second stop loses none)."""
    placed = {(run["method"], run["seed"]) for run in runs}
    return [run for key, run in done.items() if key not in placed]


def parse(argv: list[str]) -> tuple[QualityArguments, demo.DemoArguments]:
    defaults = [
        "--output_dir", str(DEFAULT_RESULTS_DIR),
        "--cache_dir", str(Path(tempfile.gettempdir()) / demo.CACHE_DIRNAME),
        "--methods", *DEFAULT_METHODS,
        "--no_save_models",
    ]  # fmt: skip
    parser = HfArgumentParser((QualityArguments, demo.DemoArguments))
    bench, args = parser.parse_args_into_dataclasses(args=defaults + list(argv))
    return bench, args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        bench, args = parse(argv)
        if bench.render is not None:
            print(render_markdown(Path(bench.render)))
            return 0
        previous = resumable_report(bench, args)
    except (ValueError, KeyError) as error:  # json.JSONDecodeError is a ValueError
        print(f"quality.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    command = shlex.join(["PYTHONPATH=src", "python", "benchmarks/quality.py", *argv])
    run_quality(bench, args, command, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
