"""Speed and memory of the DistillLens objective against research-code layouts, on the CPU, in one run.

Part 1 (loss only): ``distillens_loss`` (response tokens selected per sample first, lens logits one layer
pair at a time) against naive references that mimic research code: the lens logits of ALL mapped layers
over ALL positions are stacked into one ``[K, B, T, V]`` tensor, the divergence is computed everywhere and
the prompt/padding positions are masked afterwards. ``naive`` uses the library's divergences (so only the
tensor layout differs); ``naive_plain`` uses textbook ``log_softmax`` formulas as research code would.
Forward+backward time and peak memory; every variant runs in its own subprocess, and its peak memory is
that child's ``ru_maxrss`` minus the ``ru_maxrss`` of a baseline child that only builds the inputs.
A separate child checks that all variants give the same loss and gradients, and one profiles
``distillens_loss`` with ``torch.profiler``.

Trainer steps are measured by ``trainer_steps.py``; the fused, chunked lens at large vocabularies by
``lens_memory.py`` (which reuses :func:`naive_lens_sum` from here).

Times are medians with the interquartile range over repetitions after discarded warm-up repetitions.
Results go to ``benchmarks/results/speed.json`` and ``benchmarks/results/speed.md``.

Run from the repository root::

    PYTHONPATH=src python benchmarks/speed.py            # defaults, about 2 minutes on 2 cores
    PYTHONPATH=src python benchmarks/speed.py --quick    # small shapes, a smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from _measure import (
    RESULTS_DIR,
    emit,
    fmt_range,
    header_lines,
    llama,
    new_results,
    run_child,
    setup_torch,
    summarize,
    worker_argv,
    write_results,
)

SCRIPT = Path(__file__).resolve()
LOSS_VARIANTS = ("distillens", "naive", "naive_plain")
LOSS_LABELS = {
    "distillens": "(a) `distillens_loss`: response tokens first, one pair at a time",
    "naive": "(b) naive: stack [K,B,T,V], divergence everywhere, then mask",
    "naive_plain": "(b') naive with textbook log_softmax divergences",
}


# ============================================================================================ part 1: loss only
def build_loss_inputs(opts: argparse.Namespace) -> dict:
    """Student/teacher outputs as the trainer would hand them to the loss, plus both lenses.

    Student logits and hidden states are leaves that need gradients (as the student's outputs do);
    the student's LM head and final norm also get gradients through the lens, the teacher's do not.
    """
    import torch

    from distillens_trainer import LogitLens, ObjectiveSpec, resolve_layer_map

    torch.manual_seed(opts.seed)
    B, T, V = opts.batch, opts.seq, opts.vocab
    student = llama(opts.student_layers, opts.hidden, V, seed=opts.seed + 1)
    teacher = llama(opts.teacher_layers, opts.teacher_hidden, V, seed=opts.seed + 2).requires_grad_(False)
    student_lens, teacher_lens = LogitLens(student), LogitLens(teacher)
    layer_map = resolve_layer_map(opts.student_layers, opts.teacher_layers, num_layers=opts.pairs)

    # Hidden states of a transformer grow in norm with depth; scale so that the lens distributions are
    # neither uniform nor one-hot.
    student_hidden = tuple(
        torch.randn(B, T, opts.hidden).requires_grad_(True) for _ in range(opts.student_layers + 1)
    )
    teacher_hidden = tuple(torch.randn(B, T, opts.teacher_hidden) for _ in range(opts.teacher_layers + 1))
    with torch.no_grad():
        student_logits = student_lens(student_hidden[-1], opts.student_layers).detach().requires_grad_(True)
        teacher_logits = teacher_lens(teacher_hidden[-1], opts.teacher_layers)

    prompt = round(opts.prompt_frac * T)
    input_ids = torch.randint(3, V, (B, T))
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    spec = ObjectiveSpec(
        ce_weight=opts.ce_weight,
        kd_weight=1.0,
        kd_divergence=opts.kd_divergence,
        lens_weight=1.0,
        lens_divergence=opts.lens_divergence,
    )
    return {
        "student_logits": student_logits,
        "teacher_logits": teacher_logits,
        "labels": labels,
        "spec": spec,
        "student_hidden": student_hidden,
        "teacher_hidden": teacher_hidden,
        "student_lens": student_lens,
        "teacher_lens": teacher_lens,
        "layer_map": layer_map,
        "vocab_size": V,
        "student": student,
    }


def plain_divergence(name: str, student_logits, teacher_logits, beta: float = 0.5):
    """Textbook divergences as research code writes them: log_softmax, no floors, no dead-row handling."""
    import torch

    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    if name == "rkl":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    if name == "fkl":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if name == "jsd":
        p_s, p_t = log_s.exp(), log_t.exp()
        log_m = (beta * p_t + (1 - beta) * p_s).log()
        return beta * (p_t * (log_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_s - log_m)).sum(-1)
    raise ValueError(f"naive_plain implements rkl, fkl and jsd, not {name!r}.")


def naive_lens_sum(inputs: dict, mask, divergence):
    """Research-code lens term: every position of all K layers stacked into ``[K, B, T, V]`` logits, the
    divergence everywhere, the ``[B, T-1]`` float ``mask`` applied last; Σ over tokens, mean over pairs."""
    import torch

    V = inputs["vocab_size"]
    student_stack = torch.stack(
        [inputs["student_lens"](inputs["student_hidden"][s], s)[..., :V] for s, _ in inputs["layer_map"]]
    )  # [K, B, T, V]
    with torch.no_grad():
        teacher_stack = torch.stack(
            [inputs["teacher_lens"](inputs["teacher_hidden"][t], t)[..., :V] for _, t in inputs["layer_map"]]
        )
    lens = divergence(student_stack[:, :, :-1], teacher_stack[:, :, :-1])  # [K, B, T-1]
    return (lens * mask).sum(dim=(1, 2)).mean()


def naive_loss(inputs: dict, plain: bool = False):
    """The research-code layout: every position, all K lens layers stacked, mask applied last."""
    import torch.nn.functional as F

    from distillens_trainer import token_divergence

    spec, V = inputs["spec"], inputs["vocab_size"]
    labels = inputs["labels"]

    def divergence(name, student, teacher):
        if plain:
            return plain_divergence(name, student, teacher, spec.jsd_beta)
        return token_divergence(name, student, teacher, temperature=spec.temperature, beta=spec.jsd_beta)

    targets = labels[:, 1:]  # [B, T-1]
    mask = (targets != -100).float()
    num_tokens = mask.sum().clamp_min(1.0)
    student = inputs["student_logits"][:, :-1, :V]  # [B, T-1, V]
    teacher = inputs["teacher_logits"][:, :-1, :V].detach()
    total = student.new_zeros(())
    if spec.ce_weight > 0:
        ce = F.cross_entropy(student.float().flatten(0, 1), targets.flatten(), reduction="sum")
        total = total + spec.ce_weight * ce
    kd = divergence(spec.kd_divergence, student, teacher)  # [B, T-1]
    total = total + spec.kd_weight * (kd * mask).sum()

    lens_sum = naive_lens_sum(
        inputs, mask, lambda student, teacher: divergence(spec.lens_divergence, student, teacher)
    )
    total = total + spec.lens_weight * lens_sum
    return total / num_tokens


def ours_loss(inputs: dict):
    from distillens_trainer import distillens_loss

    return distillens_loss(
        inputs["student_logits"],
        inputs["teacher_logits"],
        inputs["labels"],
        inputs["spec"],
        vocab_size=inputs["vocab_size"],
        student_hidden_states=inputs["student_hidden"],
        teacher_hidden_states=inputs["teacher_hidden"],
        student_lens=inputs["student_lens"],
        teacher_lens=inputs["teacher_lens"],
        layer_map=inputs["layer_map"],
    ).loss


LOSS_FUNCTIONS = {
    "distillens": ours_loss,
    "naive": naive_loss,
    "naive_plain": lambda inputs: naive_loss(inputs, plain=True),
}


def grad_leaves(inputs: dict) -> list:
    params = [p for p in inputs["student"].parameters() if p.requires_grad]
    return [inputs["student_logits"], *inputs["student_hidden"], *params]


def clear_grads(inputs: dict) -> None:
    for tensor in grad_leaves(inputs):
        tensor.grad = None


def worker_loss(opts: argparse.Namespace, variant: str) -> dict:
    setup_torch(opts.threads)
    load_at_start = list(os.getloadavg())
    inputs = build_loss_inputs(opts)
    result = {"variant": variant, "load_at_start": load_at_start}
    if variant == "baseline":
        return result
    fn = LOSS_FUNCTIONS[variant]
    forward, total = [], []
    for _ in range(opts.warmup + opts.reps):
        clear_grads(inputs)
        start = time.perf_counter()
        loss = fn(inputs)
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        forward.append(middle - start)
        total.append(end - start)
        result["loss"] = loss.item()
        del loss
    result["forward_s"] = forward[opts.warmup :]
    result["forward_backward_s"] = total[opts.warmup :]
    return result


def worker_check(opts: argparse.Namespace) -> dict:
    """Loss values and gradients of every variant on the same inputs, compared with (a)."""
    torch = setup_torch(opts.threads)
    inputs = build_loss_inputs(opts)
    losses, grads = {}, {}
    for variant, fn in LOSS_FUNCTIONS.items():
        clear_grads(inputs)
        loss = fn(inputs)
        loss.backward()
        losses[variant] = loss.item()
        grads[variant] = [
            t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in grad_leaves(inputs)
        ]
        del loss
    result = {"losses": losses, "max_abs_loss_diff": {}, "max_abs_grad_diff": {}}
    reference = grads["distillens"]
    result["max_abs_grad"] = max(g.abs().max().item() for g in reference)
    for variant in LOSS_FUNCTIONS:
        if variant == "distillens":
            continue
        result["max_abs_loss_diff"][variant] = abs(losses[variant] - losses["distillens"])
        result["max_abs_grad_diff"][variant] = max(
            (a - b).abs().max().item() for a, b in zip(reference, grads[variant])
        )
    return result


def worker_profile(opts: argparse.Namespace) -> dict:
    """torch.profiler on one forward+backward of ``distillens_loss`` after a warm-up call."""
    setup_torch(opts.threads)
    from torch.profiler import ProfilerActivity, profile

    inputs = build_loss_inputs(opts)
    for _ in range(max(opts.warmup, 1)):
        clear_grads(inputs)
        ours_loss(inputs).backward()
    clear_grads(inputs)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ours_loss(inputs).backward()
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: opts.profile_top]
    return {
        "total_self_cpu_ms": total_self / 1000.0,
        "top_ops": [
            {
                "op": e.key,
                "calls": e.count,
                "self_cpu_ms": e.self_cpu_time_total / 1000.0,
                "self_cpu_pct": 100.0 * e.self_cpu_time_total / total_self,
                "self_cpu_memory_mib": e.self_cpu_memory_usage / 2**20,
            }
            for e in rows
        ],
    }


# ============================================================================================ orchestration
def run_loss_part(opts: argparse.Namespace) -> dict:
    B, T = opts.batch, opts.seq
    prompt = round(opts.prompt_frac * T)
    response_tokens = B * (T - prompt)
    part = {
        "config": {
            "batch": B,
            "seq": T,
            "prompt_tokens_per_row": prompt,
            "vocab": opts.vocab,
            "student": f"{opts.student_layers} layers x {opts.hidden}",
            "teacher": f"{opts.teacher_layers} layers x {opts.teacher_hidden}",
            "pairs": opts.pairs,
            "ce_weight": opts.ce_weight,
            "kd_divergence": opts.kd_divergence,
            "lens_divergence": opts.lens_divergence,
            "dtype": "float32",
            "warmup_reps": opts.warmup,
            "timed_reps_per_round": opts.reps,
            "rounds": opts.loss_rounds,
        },
        "response_tokens": response_tokens,
        "all_positions": B * (T - 1),
        "stacked_lens_tensor_mib": opts.pairs * B * T * opts.vocab * 4 / 2**20,
        "selected_pair_tensor_mib": response_tokens * opts.vocab * 4 / 2**20,
    }
    samples = {
        v: {"forward_s": [], "forward_backward_s": [], "rss_delta_mib": [], "loss": []} for v in LOSS_VARIANTS
    }
    baselines, loads = [], []
    for round_index in range(opts.loss_rounds):
        order = LOSS_VARIANTS if round_index % 2 == 0 else tuple(reversed(LOSS_VARIANTS))
        baseline = run_child(SCRIPT, opts.argv, "loss:baseline", opts.threads)
        baselines.append(baseline["max_rss_mib"])
        loads.append(baseline["load_at_start"][0])
        for variant in order:
            result = run_child(SCRIPT, opts.argv, f"loss:{variant}", opts.threads)
            loads.append(result["load_at_start"][0])
            entry = samples[variant]
            entry["forward_s"] += result["forward_s"]
            entry["forward_backward_s"] += result["forward_backward_s"]
            entry["rss_delta_mib"].append(result["max_rss_mib"] - baseline["max_rss_mib"])
            entry["loss"].append(result["loss"])
    part["baseline_max_rss_mib"] = statistics.median(baselines)
    part["variants"] = {}
    reference = None
    for variant in LOSS_VARIANTS:
        entry = samples[variant]
        summary = {
            "label": LOSS_LABELS[variant],
            "forward_backward_s": summarize(entry["forward_backward_s"]),
            "forward_s": summarize(entry["forward_s"]),
            "peak_rss_delta_mib": statistics.median(entry["rss_delta_mib"]),
            "peak_rss_delta_mib_per_round": entry["rss_delta_mib"],
            "loss": entry["loss"][0],
        }
        part["variants"][variant] = summary
        reference = reference or summary
        summary["time_vs_distillens"] = (
            summary["forward_backward_s"]["median"] / reference["forward_backward_s"]["median"]
        )
        summary["memory_vs_distillens"] = summary["peak_rss_delta_mib"] / max(
            reference["peak_rss_delta_mib"], 1e-9
        )
    part["load_1min_at_worker_start"] = [min(loads), max(loads)]
    part["check"] = run_child(SCRIPT, opts.argv, "loss:check", opts.threads)
    if opts.profile_top > 0:
        part["profile_distillens_loss"] = run_child(SCRIPT, opts.argv, "loss:profile", opts.threads)
    return part


# ============================================================================================ report
def markdown(results: dict) -> str:
    lines = header_lines(
        results, "DistillLens speed benchmark (CPU): the objective against research-code layouts"
    )
    loss = results.get("loss")
    if loss:
        c = loss["config"]
        lines += [
            "## 1. Loss only: forward + backward of the objective",
            "",
            f"batch {c['batch']}, seq {c['seq']} ({c['prompt_tokens_per_row']} prompt tokens per row, no padding), "
            f"vocab {c['vocab']}, student {c['student']}, teacher {c['teacher']}, {c['pairs']} layer pairs, "
            f"ce_weight {c['ce_weight']}, kd {c['kd_divergence']}, lens {c['lens_divergence']}, fp32; "
            f"{loss['response_tokens']} response tokens of {loss['all_positions']} shifted positions. "
            f"{c['warmup_reps']} warm-up + {c['timed_reps_per_round']} timed repetitions per variant and round, "
            f"{c['rounds']} round(s); each variant in its own subprocess. Peak memory = the variant's "
            f"`ru_maxrss` minus that of a child that only builds the inputs ({loss['baseline_max_rss_mib']:.0f} MiB). "
            f"One [K,B,T,V] fp32 tensor is {loss['stacked_lens_tensor_mib']:.0f} MiB; one pair's "
            f"[N,V] is {loss['selected_pair_tensor_mib']:.0f} MiB. 1-min load average when the workers "
            f"started: {fmt_range(loss['load_1min_at_worker_start'])}.",
            "",
            "| variant | fwd+bwd median (IQR) | forward median | time vs (a) | peak memory over baseline | memory vs (a) | loss |",
            "|---|---|---|---|---|---|---|",
        ]
        for v in loss["variants"].values():
            lines.append(
                f"| {v['label']} | {v['forward_backward_s']['median']:.3f} s ({v['forward_backward_s']['iqr']:.3f}) "
                f"| {v['forward_s']['median']:.3f} s | {v['time_vs_distillens']:.2f}x "
                f"| {v['peak_rss_delta_mib']:.0f} MiB | {v['memory_vs_distillens']:.2f}x | {v['loss']:.6f} |"
            )
        check = loss["check"]
        lines += [
            "",
            "Same inputs, one process: max |loss - loss(a)| "
            + ", ".join(f"{k} {val:.2e}" for k, val in check["max_abs_loss_diff"].items())
            + "; max |grad - grad(a)| over student logits, hidden states and LM head/norm "
            + ", ".join(f"{k} {val:.2e}" for k, val in check["max_abs_grad_diff"].items())
            + f" (largest gradient entry {check['max_abs_grad']:.2e}).",
            "",
        ]
        prof = loss.get("profile_distillens_loss")
        if prof:
            lines += [
                f"### Profile of (a), one forward+backward ({prof['total_self_cpu_ms']:.0f} ms self CPU in total)",
                "",
                "| op | calls | self CPU | share | self memory |",
                "|---|---|---|---|---|",
            ]
            for op in prof["top_ops"]:
                lines.append(
                    f"| `{op['op']}` | {op['calls']} | {op['self_cpu_ms']:.1f} ms | {op['self_cpu_pct']:.1f}% "
                    f"| {op['self_cpu_memory_mib']:.0f} MiB |"
                )
            lines.append("")
    return "\n".join(lines)


# ============================================================================================ CLI
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small shapes and few repetitions (smoke test)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per worker; 1 by default because on a small shared machine OpenMP "
        "threads that wait on busy cores make timings several times slower and noisier",
    )
    p.add_argument(
        "--loss-rounds",
        type=int,
        default=1,
        help="loss-only: run every variant this many times, order alternating",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-frac", type=float, default=0.5, help="fraction of each row that is prompt")
    p.add_argument("--pairs", type=int, default=5, help="lens layer pairs (K)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    g = p.add_argument_group("loss-only benchmark")
    g.add_argument("--batch", type=int, default=2)
    g.add_argument("--seq", type=int, default=128)
    g.add_argument("--vocab", type=int, default=32000)
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--teacher-hidden", type=int, default=384)
    g.add_argument("--student-layers", type=int, default=6)
    g.add_argument("--teacher-layers", type=int, default=12)
    g.add_argument("--ce-weight", type=float, default=0.0)
    g.add_argument("--kd-divergence", default="rkl")
    g.add_argument("--lens-divergence", default="jsd")
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--reps", type=int, default=4)
    g.add_argument(
        "--profile-top", type=int, default=12, help="ops listed from the profile of (a); 0 = skip it"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.quick:
        opts.batch, opts.seq, opts.vocab, opts.reps = 2, 64, 4096, 3
    # What the workers are started with: the parsed options minus the worker flag.
    opts.argv = worker_argv(argv)
    if "--threads" not in opts.argv:
        opts.argv += ["--threads", str(opts.threads)]
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    if opts.worker:
        kind, _, variant = opts.worker.partition(":")
        if kind == "loss" and variant == "check":
            emit(worker_check(opts))
        elif kind == "loss" and variant == "profile":
            emit(worker_profile(opts))
        else:
            emit(worker_loss(opts, variant))
        return 0

    results = new_results("speed.py", argv, opts.threads)
    start = time.perf_counter()
    print("loss-only benchmark", flush=True)
    results["loss"] = run_loss_part(opts)
    results["total_wall_s"] = time.perf_counter() - start
    write_results(opts.out_dir, "speed", results, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
