"""A DistillLens step sharded with FSDP2 against the same step under DeepSpeed ZeRO-3, side by side on 2 CPU processes.

Both launch ``tests/distributed/train_tiny.py`` with torchrun (2 processes, gloo, 1 thread each) on the same models:
a Llama student (3 blocks) and a Qwen2 teacher (4 blocks) of width ``--hidden-size`` over the tiny 64-token
vocabulary, KD + lens (3 pairs) on the fused path, per-device batch 2, ``--steps`` optimizer steps. Variants, run
in turn ``--reps`` times (alternating, so drifting machine load hits both alike):

- ``fsdp2``: the Trainer's ``fsdp`` arguments (FSDP2; the student sharded by accelerate, the teacher by
  DistillLensTrainer, each per decoder layer then its root);
- ``zero3``: ``examples/deepspeed/zero3.json`` (both models partitioned; the lens gathers through DeepSpeed).

The time of a step is rank 0's wall time from ``on_step_begin`` to ``on_step_end`` (forward, objective, backward,
optimizer), the first step left out (warm-up); each launch gives the median of its steps.

    PYTHONPATH=src python benchmarks/sharded_steps.py       # ~4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import (
    RESULTS_DIR,
    ROOT,
    fmt_ratio,
    fmt_time,
    header_lines,
    new_results,
    summarize,
    write_results,
)

TINY = ROOT / "tests" / "distributed" / "train_tiny.py"
VARIANTS = {
    "fsdp2": ["--fsdp"],
    "zero3": ["--deepspeed", str(ROOT / "examples" / "deepspeed" / "zero3.json")],
}


def train_tiny_module():
    """``tests/distributed/train_tiny.py``, imported (it builds the models both variants train)."""
    sys.path.insert(0, str(TINY.parent))
    import train_tiny

    return train_tiny


def launch(models: Path, out: Path, variant: str, opts: argparse.Namespace) -> list[float]:
    """One torchrun launch of ``variant``; rank 0's per-step seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr"]
    command += ["127.0.0.1", "--master_port", str(opts.port), str(TINY), "train", "--models", str(models)]
    command += ["--out", str(out), "--teacher", "qwen2_teacher", "--per-device-batch", "2"]
    command += ["--steps", str(opts.steps), *VARIANTS[variant]]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads((out / "result.json").read_text())["step_seconds"]


def markdown(results: dict) -> str:
    lines = header_lines(results, "FSDP2 against DeepSpeed ZeRO-3: one DistillLens step on 2 CPU processes")
    settings = results["settings"]
    lines += [
        f"Student Llama 3 × {settings['hidden_size']}, teacher Qwen2 4 × {settings['hidden_size'] + 16}, vocabulary "
        f"64, per-device batch 2, {settings['steps']} steps per launch (the first left out), {settings['reps']} "
        "launches per variant, alternating. Median over launches of each launch's median step (rank 0).",
        "",
        "| variant | step | / ZeRO-3 |",
        "|---|---|---|",
    ]
    zero3 = results["variants"]["zero3"]["median"]
    for name, summary in results["variants"].items():
        lines.append(f"| {name} | {fmt_time(summary)} | {fmt_ratio(summary['median'] / zero3)} |")
    lines += ["", f"Goal: FSDP2 ≤ 1.2 × ZeRO-3; measured {fmt_ratio(results['ratio'])}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--port", type=int, default=29733)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="sharded_steps")
    opts = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    results = new_results("sharded_steps.py", argv, threads=1)
    results["settings"] = {"hidden_size": opts.hidden_size, "steps": opts.steps, "reps": opts.reps}
    launches: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        train_tiny_module().make_models(models, opts.hidden_size)
        for rep in range(opts.reps):
            for name in VARIANTS:
                seconds = launch(models, Path(tmp) / f"{name}_{rep}", name, opts)
                launches[name].append(statistics.median(seconds[1:]))
                print(f"{name} launch {rep + 1}: median step {launches[name][-1]:.3f} s", flush=True)
    results["variants"] = {name: summarize(values) for name, values in launches.items()}
    results["ratio"] = results["variants"]["fsdp2"]["median"] / results["variants"]["zero3"]["median"]
    write_results(opts.out_dir, opts.name, results, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
