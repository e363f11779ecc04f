"""Evaluation with and without ``compute_metrics``, side by side: what keeping the logits for the metrics costs.

``compute_metrics`` makes ``Trainer.evaluate`` ask ``compute_loss(..., return_outputs=True)`` for the student's
logits. The DistillLens trainer then still computes its KD / CE / lens terms on the fused path (the teacher returns
one position); only the student's own ``[B, T, V]`` logits are made, for the metrics. Random Llamas (student 6 ×
128, teacher 12 × 256) with GPT-2's vocabulary size (50,257, as in HF's ``run_clm.py``), 32 rows of 256 tokens
(half prompt), eval batch 4, ``preprocess_logits_for_metrics`` = argmax and token accuracy as the metric (as
``run_clm.py`` does). Variants, each evaluated ``--reps`` times in turn in one process (CPU and wall seconds):

- ``trainer``: plain ``transformers.Trainer`` (the model's CE), without and with the metric;
- ``distillens``: ``DistillLensTrainer`` with KD + one lens pair (the issue's setting), without and with it.

    PYTHONPATH=src python benchmarks/eval_metrics.py      # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import RESULTS_DIR, header_lines, llama, new_results, setup_torch, summarize, write_results
from trainer_steps import batches, collate


def argmax_logits(logits, labels):
    return logits.argmax(dim=-1)


def token_accuracy(prediction) -> dict:
    predictions, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]
    mask = labels != -100
    return {"accuracy": float((predictions[mask] == labels[mask]).mean())}


def build(opts: argparse.Namespace, variant: str, with_metrics: bool, output_dir: str):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from distillens_trainer import DistillLensConfig, DistillLensTrainer

    dataset = Dataset.from_list(batches(opts, opts.rows, opts.vocab))
    common = dict(
        output_dir=output_dir, per_device_eval_batch_size=opts.batch, report_to=[], use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    metrics = (
        {"compute_metrics": token_accuracy, "preprocess_logits_for_metrics": argmax_logits}
        if with_metrics
        else {}
    )
    student = llama(6, 128, opts.vocab, seed=1)
    if variant == "trainer":
        return Trainer(
            model=student,
            args=TrainingArguments(**common),
            eval_dataset=dataset,
            data_collator=collate,
            **metrics,
        )
    args = DistillLensConfig(**common, kd_weight=1.0, lens_weight=1.0, lens_num_layers=1)
    return DistillLensTrainer(
        model=student, teacher_model=llama(12, 256, opts.vocab, seed=2), args=args, eval_dataset=dataset,
        data_collator=collate, **metrics,
    )  # fmt: skip


def run(opts: argparse.Namespace) -> dict:
    setup_torch(opts.threads)
    keys = [(variant, metrics) for variant in ("trainer", "distillens") for metrics in (False, True)]
    samples = {key: {"wall": [], "cpu": []} for key in keys}
    with tempfile.TemporaryDirectory() as output_dir:
        trainers = {key: build(opts, *key, output_dir) for key in keys}
        for trainer in trainers.values():  # warm-up (and the fused heads' one-time probe)
            trainer.evaluate()
        for _ in range(opts.reps):
            for key, trainer in trainers.items():
                wall, cpu = time.perf_counter(), time.process_time()
                trainer.evaluate()
                samples[key]["wall"].append(time.perf_counter() - wall)
                samples[key]["cpu"].append(time.process_time() - cpu)
    table = {
        f"{variant}{'_metrics' if metrics else ''}": {
            clock: summarize(values) for clock, values in clocks.items()
        }
        for (variant, metrics), clocks in samples.items()
    }
    ratios = {
        f"{variant}_metrics_vs_{variant}": table[f"{variant}_metrics"]["cpu"]["median"]
        / table[variant]["cpu"]["median"]
        for variant in ("trainer", "distillens")
    }
    return {"variants": table, "goals": ratios}


def markdown(results: dict) -> str:
    c = results["config"]
    lines = header_lines(results, "Evaluation with and without compute_metrics")
    lines += [
        f"Random Llamas (student 6 × 128, teacher 12 × 256), vocabulary {c['vocab']}, {c['rows']} rows × {c['seq']} "
        f"tokens (half prompt), eval batch {c['batch']}; median of {c['reps']} `evaluate()` calls after one warm-up, "
        "all variants in one process, in turn. Metric: token accuracy from argmax logits.",
        "",
        "| variant | CPU s / evaluate (IQR) | wall s |",
        "|---|---|---|",
    ]
    for name, clocks in results["variants"].items():
        cpu = clocks["cpu"]
        lines.append(f"| {name} | {cpu['median']:.3f} ({cpu['iqr']:.3f}) | {clocks['wall']['median']:.3f} |")
    lines += ["", "Ratios (goal: DistillLens with the metric ≤ 1.3 × without):", ""]
    lines += [f"- `{key}`: {value:.3f}" for key, value in results["goals"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    opts = p.parse_args(argv)
    opts.seed, opts.prompt_frac = (
        0,
        0.5,
    )  # trainer_steps.batches: random ids, the first half of every row prompt
    results = new_results("eval_metrics.py", argv, opts.threads)
    results["config"] = {key: getattr(opts, key) for key in ("vocab", "rows", "seq", "batch", "reps")}
    results |= run(opts)
    write_results(opts.out_dir, "eval_metrics", results, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
