"""The GPU run, in one command (about 8 minutes on one H200): equality of the fused path on the device, then step
time and peak memory at real shapes beside TRL's GKD (with and without Liger), results in ``benchmarks/results/gpu/``.

1. *Equality*: every divergence through ``fused_head_loss`` against the straightforward computation (full logits,
   autograd) on the device, in fp32 (TF32 off) and bf16 (head inputs and weights in bf16, as under autocast), values
   and gradients w.r.t. the head input and weight, padded teacher vocabulary and temperature 2 included; then a
   whole ``DistillLensTrainer.compute_loss`` (KD + CE + 3 lens pairs) fused against ``head_chunk_size=0`` with
   its gradients on tiny Llamas. Tolerances: fp32 1e-4, bf16 2e-2 (relative to the largest entry).
2. *Steps*: ``benchmarks/trainer_steps.py --device cuda --shapes llama-1b-3b --bf16``: a random Llama-3.2-1B-shaped
   student (V = 128,256, fp32 master weights, bf16 autocast) and a 3B-shaped teacher (bf16) at 2,048 and 8,192
   response tokens; KD (fused), DistillLens eager and compiled, TRL ``GKDTrainer`` with and without
   ``use_liger_kernel``, and the lens floor (the 4 head products per pair, bf16); wall seconds per step, response
   tokens per second, peak GPU memory (``torch.cuda.max_memory_allocated``). A size is not started once
   ``--budget-s`` is spent.

On a bare CUDA PyTorch image, hand it the missing pure-Python packages as wheels in ``.whl/`` (``benchmarks/gpu/
README.md`` lists them and the download command) and start it with ``bash benchmarks/gpu/run_gpu.sh``. Checked on
the CPU with ``--device cpu --quick`` (tiny shapes, results under the system's temp folder)::

    PYTHONPATH=src python benchmarks/gpu/run_gpu.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distillens_trainer.loss.divergences import DIVERGENCE_NAMES, token_divergence
from distillens_trainer.loss.fused import FusedJob, HeadTeacher, fused_head_loss
from distillens_trainer.loss.heads import LinearHead

BENCHMARKS = Path(__file__).resolve().parents[1]
RESULTS = BENCHMARKS / "results" / "gpu"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = float(want.abs().max().clamp_min(1e-12))
    return float((got.float() - want.float()).abs().max()) / scale


def head_case(name: str, dtype: torch.dtype, device: str, temperature: float, quick: bool) -> dict:
    """One divergence, fused against full logits, on the device: the largest relative error of value and grads."""
    n, d_s, d_t, vocab = (97, 32, 48, 300) if quick else (1531, 512, 768, 32000)
    generator = torch.Generator().manual_seed(0)
    student_w = (torch.randn(vocab + 8, d_s, generator=generator) * d_s**-0.5).to(device, dtype)
    teacher_w = (torch.randn(vocab + 64, d_t, generator=generator) * 2 * d_t**-0.5).to(device, dtype)
    student_x = torch.randn(n, d_s, generator=generator).to(device, dtype)
    teacher_x = torch.randn(n, d_t, generator=generator).to(device, dtype)
    values, grads = [], []
    for fused in (True, False):
        x, w = student_x.clone().requires_grad_(), student_w.clone().requires_grad_()
        if fused:
            job = FusedJob(x, HeadTeacher(teacher_x, LinearHead(teacher_w)), name, 1.0)
            total, _ = fused_head_loss(
                LinearHead(w), [job], vocab_size=vocab, temperature=temperature, chunk_size=128
            )
        else:
            student_logits = F.linear(x, w)[:, :vocab].float()
            teacher_logits = F.linear(teacher_x, teacher_w)[:, :vocab].float()
            total = token_divergence(name, student_logits, teacher_logits, temperature=temperature).sum()
        values.append(total.detach())
        grads.append(torch.autograd.grad(total, [x, w]))
    errors = {
        "value": relative_error(values[0], values[1]),
        "grad_input": relative_error(grads[0][0], grads[1][0]),
        "grad_weight": relative_error(grads[0][1], grads[1][1]),
    }
    return {"case": f"head {name} T={temperature}", "dtype": str(dtype).removeprefix("torch."), **errors}


def trainer_case(dtype: torch.dtype, device: str) -> dict:
    """``DistillLensTrainer.compute_loss`` (KD + CE + lens) fused against ``head_chunk_size=0``, with gradients."""
    import transformers

    from distillens_trainer import DistillLensConfig, DistillLensTrainer

    def tiny(layers: int, seed: int):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(
            num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, pad_token_id=2, attn_implementation="eager",
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config).to(device, dtype)

    student, teacher = tiny(4, 1), tiny(6, 2)
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, 1000, (4, 48), generator=generator)
    labels = input_ids.clone()
    labels[:, :20] = -100
    labels[1, 40:] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    losses, grads = [], []
    with tempfile.TemporaryDirectory() as output_dir:
        for chunk_size in (64, 0):
            args = DistillLensConfig(
                output_dir=output_dir, report_to=[], use_cpu=device == "cpu", lens_num_layers=3,
                ce_weight=0.5, head_chunk_size=chunk_size,
            )  # fmt: skip
            trainer = DistillLensTrainer(model=copy.deepcopy(student), args=args, teacher_model=teacher)
            model = trainer.model
            inputs = {key: value.to(model.device) for key, value in batch.items()}
            loss = trainer.compute_loss(model, inputs, num_items_in_batch=int((labels[:, 1:] != -100).sum()))
            loss.backward()
            losses.append(loss.detach().float())
            grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters()]))
    return {
        "case": "DistillLensTrainer.compute_loss, KD + CE + 3 lens pairs",
        "dtype": str(dtype).removeprefix("torch."),
        "value": relative_error(losses[0], losses[1]),
        "grad_input": None,
        "grad_weight": relative_error(grads[0], grads[1]),
    }


def equality(device: str, quick: bool) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name in DIVERGENCE_NAMES:
            for temperature in (1.0, 2.0):
                rows.append(head_case(name, dtype, device, temperature, quick))
        rows.append(trainer_case(dtype, device))
        for row in rows[-(2 * len(DIVERGENCE_NAMES) + 1) :]:
            errors = [row[key] for key in ("value", "grad_input", "grad_weight") if row[key] is not None]
            row["ok"] = max(errors) <= TOLERANCE[dtype]
            print(json.dumps(row), flush=True)
    return rows


def steps(opts: argparse.Namespace, started: float) -> list[dict]:
    """``trainer_steps.py`` at each response-token count, while the budget lasts; what each run wrote."""
    runs = []
    for tokens in opts.tokens:
        if time.perf_counter() - started > opts.budget_s:
            runs.append({"tokens": tokens, "skipped": f"the {opts.budget_s:.0f} s budget was spent"})
            continue
        seq = 256 if opts.quick else 4096
        batch = max(1, 2 * tokens // seq)  # half of every row is prompt
        command = [
            sys.executable, str(BENCHMARKS / "trainer_steps.py"), "--device", opts.device, "--shapes", "llama-1b-3b",
            "--bf16", "--batch", str(batch), "--seq", str(seq), "--warmup-steps", "1", "--steps", str(opts.steps),
            "--rounds", "1", "--out-dir", str(opts.out_dir), "--tag", f"{tokens}tokens",
            "--variants", *opts.variants,
        ] + (["--quick"] if opts.quick else [])  # fmt: skip
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=False)
        runs.append({"tokens": tokens, "command": command[1:]})
    return runs


def markdown(report: dict) -> str:
    lines = [
        "# GPU run",
        "",
        f"Device: {report['device_name']}; torch {report['torch']}; {report['date']}; {report['wall_s']:.0f} s in all.",
        "",
        "## Fused path == straightforward on the device (largest error relative to the largest entry)",
        "",
        "| case | dtype | value | grad input | grad weight | within tolerance |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["equality"]:
        cells = ["-" if row[k] is None else f"{row[k]:.1e}" for k in ("value", "grad_input", "grad_weight")]
        lines.append(
            f"| {row['case']} | {row['dtype']} | {' | '.join(cells)} | {'yes' if row['ok'] else '**no**'} |"
        )
    lines += ["", "## Steps at real shapes", ""]
    for run in report["steps"]:
        name = f"trainer_steps_llama1b3b_{run['tokens']}tokens.md"
        lines.append(f"- {run['tokens']} response tokens: " + (run.get("skipped") or f"[{name}]({name})"))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument(
        "--quick", action="store_true", help="tiny shapes and cases (a check of the script itself)"
    )
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="response tokens per step (2048 8192)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["kd_fused", "distillens_fused", "distillens_compiled", "gkd", "gkd_liger"],
    )
    p.add_argument("--budget-s", type=float, default=420.0, help="no new size is started after this")
    p.add_argument("--out-dir", type=Path, default=None, help=f"default {RESULTS} (--quick: a temp folder)")
    opts = p.parse_args(argv)
    opts.tokens = opts.tokens or ([64] if opts.quick else [2048, 8192])
    if opts.out_dir is None:
        opts.out_dir = Path(tempfile.gettempdir()) / "distillens_gpu" if opts.quick else RESULTS
    if opts.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (check on the CPU with --device cpu --quick)")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(list(sys.argv[1:] if argv is None else argv))
    started = time.perf_counter()
    report = {
        "device_name": torch.cuda.get_device_name() if opts.device == "cuda" else "CPU",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "equality": equality(opts.device, opts.quick),
    }
    report["steps"] = steps(opts, started)
    report["wall_s"] = time.perf_counter() - started
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    (opts.out_dir / "gpu_run.json").write_text(json.dumps(report, indent=2) + "\n")
    (opts.out_dir / "gpu_run.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(row["ok"] for row in report["equality"]) else 1


if __name__ == "__main__":
    sys.exit(main())
