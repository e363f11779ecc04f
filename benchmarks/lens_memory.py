"""Peak memory and time of the lens term alone (forward + backward): naive, straightforward, fused, compiled.

Variants, each in its own subprocess (peak memory = its ``ru_maxrss`` minus that of a child that only builds
the same inputs):

- ``naive``: the research-code layout, every position of all K layers stacked into ``[K, B, T, V]`` logits,
  masked afterwards (``speed.naive_lens_sum``);
- ``straightforward``: the library with ``head_chunk_size=0`` — response tokens first, one layer pair at a
  time, ``[N, V]`` logits and autograd's temporaries per pair (``objective.lens_pair_sum``);
- ``fused``: the chunked head + divergence with closed-form gradients (``fused.fused_head_loss``, all K pairs
  in one pass, never more than chunk × V logits alive);
- ``fused_compiled``: the same with the per-chunk math under ``torch.compile``, where the library offers it.

Two sections: *speed* (every variant, warm-up + timed repetitions, medians) and *memory* (one run per point,
a token scan at the large vocabulary). A variant whose predicted peak exceeds ``--mem-budget-gib`` (or half of
the machine's available memory) is not started; where at least two token counts were measured, its peak is
extrapolated linearly in N to the skipped ones, labelled as such.

Run from the repository root::

    PYTHONPATH=src python benchmarks/lens_memory.py            # default grid, ~20-25 minutes on 2 busy cores
    PYTHONPATH=src python benchmarks/lens_memory.py --quick    # small shapes, ~1-2 minutes
    PYTHONPATH=src python benchmarks/lens_memory.py --render benchmarks/results/lens_memory.json  # table only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _measure import (
    RESULTS_DIR,
    emit,
    fit_line,
    fmt_ratio,
    header_lines,
    llama,
    mem_available_mib,
    new_results,
    run_child,
    setup_torch,
    summarize,
    worker_argv,
    write_results,
)

from distillens_trainer.loss.fused import resolve_chunk_size
from distillens_trainer.loss.fused_math import CHUNK_BLOCKS
from distillens_trainer.loss.spec import DEFAULT_CHUNK_SIZE, check_chunk_size

SCRIPT = Path(__file__).resolve()
VARIANTS = ("naive", "straightforward", "fused", "fused_compiled")
LABELS = {
    "naive": "naive: stack [K,B,T,V], mask last",
    "straightforward": "straightforward (`head_chunk_size=0`)",
    "fused": "fused, eager",
    "fused_compiled": "fused, `torch.compile`",
}
# Predicted peak over the inputs as multiples of one fp32 logits tensor, calibrated on --quick runs: autograd
# keeps ~7.4 [N,V] tensors per pair for every pair until backward (straightforward), ~16 stacked [K,B,T,V]
# tensors (naive); the fused path at most CHUNK_BLOCKS chunk x V blocks (tests/loss/test_fused.py counts them).
STRAIGHTFORWARD_TEMPORARIES_PER_PAIR = 8
NAIVE_TEMPORARIES = 16
CLOCK_KEYS = {"wall": "forward_backward_s", "cpu": "forward_backward_cpu_s"}


# ============================================================================================ the fused API
def fused_lens_sum(inputs: dict, chunk_size: int, compiled: bool):
    """Σ over response tokens, mean over pairs, of D_lens through the fused chunked head (scalar fp32), with the
    jobs ``DistillLensObjective`` builds for the lens term."""
    from distillens_trainer.loss.fused import FusedJob, HeadTeacher, fused_head_loss

    student_lens, teacher_lens, spec = inputs["student_lens"], inputs["teacher_lens"], inputs["spec"]
    teacher_head, pairs = teacher_lens.linear_head(), inputs["layer_map"]
    jobs = [
        FusedJob(
            student_input=student_lens.to_head_input(inputs["student_selected"][s], s),
            teacher=HeadTeacher(teacher_lens.to_head_input(inputs["teacher_selected"][t], t), teacher_head),
            divergence=spec.lens_divergence,
            weight=1.0 / len(pairs),
        )
        for s, t in pairs
    ]
    total, _ = fused_head_loss(
        student_lens.linear_head(),
        jobs,
        vocab_size=inputs["vocab_size"],
        temperature=spec.temperature,
        beta=spec.jsd_beta,
        chunk_size=chunk_size,
        compile_math=compiled,
    )
    return total


# ============================================================================================ worker
def build_inputs(opts: argparse.Namespace, vocab: int, tokens: int, hidden: int) -> dict:
    """Hidden states of the mapped layers (all positions, half prompt) and both lenses; ``tokens`` response
    tokens in ``B = max(1, tokens // 512)`` rows. Only the lens's norm and head matter, so the blocks are tiny."""
    import torch

    from distillens_trainer import LogitLens, ObjectiveSpec, resolve_layer_map
    from distillens_trainer.loss.response_tokens import response_mask, select_response

    dtype = getattr(torch, opts.dtype)
    rows = max(1, tokens // 512)
    seq = 2 * tokens // rows + 1  # (seq - 1) / 2 response positions per row after the shift
    student = llama(opts.student_layers, hidden, vocab, seed=opts.seed + 1, intermediate=64).to(dtype)
    teacher_hidden = round(hidden * opts.teacher_hidden_factor)
    teacher = llama(opts.teacher_layers, teacher_hidden, vocab, seed=opts.seed + 2, intermediate=64)
    teacher = teacher.to(dtype).requires_grad_(False)
    layer_map = resolve_layer_map(opts.student_layers, opts.teacher_layers, num_layers=opts.pairs)
    torch.manual_seed(opts.seed)
    labels = torch.randint(3, vocab, (rows, seq))
    labels[:, : seq - tokens // rows] = -100
    mask = response_mask(labels)
    student_hidden = {
        s: torch.randn(rows, seq, hidden, dtype=dtype, requires_grad=True) for s, _ in layer_map
    }
    teacher_states = {t: torch.randn(rows, seq, teacher_hidden, dtype=dtype) for _, t in layer_map}
    return {
        "student": student,
        "student_lens": LogitLens(student),
        "teacher_lens": LogitLens(teacher),
        "layer_map": layer_map,
        "vocab_size": vocab,
        "spec": ObjectiveSpec(kd_weight=0.0, lens_weight=1.0, lens_divergence=opts.divergence),
        "mask": mask,
        "student_hidden": student_hidden,
        "teacher_hidden": teacher_states,
        "select": lambda h: select_response(h, mask),
    }


def straightforward_lens_sum(inputs: dict):
    from distillens_trainer.loss.reference import lens_pair_sum

    sums = [
        lens_pair_sum(
            inputs["student_selected"][s],
            inputs["teacher_selected"][t],
            s,
            t,
            inputs["student_lens"],
            inputs["teacher_lens"],
            inputs["vocab_size"],
            inputs["spec"],
        )
        for s, t in inputs["layer_map"]
    ]
    return sum(sums) / len(sums)


def naive_sum(inputs: dict):
    from speed import naive_lens_sum

    from distillens_trainer import token_divergence

    spec = inputs["spec"]

    def divergence(student, teacher):
        return token_divergence(
            spec.lens_divergence, student, teacher, temperature=spec.temperature, beta=spec.jsd_beta
        )

    return naive_lens_sum(inputs, inputs["mask"].float(), divergence)


def lens_loss(inputs: dict, variant: str, chunk_size: int):
    """The lens term of one micro-batch over its response tokens (selection included, as in the library)."""
    num_tokens = max(int(inputs["mask"].sum()), 1)
    if variant == "naive":
        return naive_sum(inputs) / num_tokens
    inputs["student_selected"] = {s: inputs["select"](h) for s, h in inputs["student_hidden"].items()}
    inputs["teacher_selected"] = {t: inputs["select"](h) for t, h in inputs["teacher_hidden"].items()}
    if variant == "straightforward":
        return straightforward_lens_sum(inputs) / num_tokens
    return fused_lens_sum(inputs, chunk_size, compiled=variant == "fused_compiled") / num_tokens


def worker(opts: argparse.Namespace, name: str) -> dict:
    import os

    setup_torch(opts.threads)
    variant, vocab, tokens, hidden, runs = name.split(":")
    result = {"variant": variant, "load_at_start": list(os.getloadavg())}
    inputs = build_inputs(opts, int(vocab), int(tokens), int(hidden))
    result["response_tokens"] = int(inputs["mask"].sum())
    if variant == "baseline":
        return result
    leaves = [*inputs["student_hidden"].values(), *inputs["student"].parameters()]
    forward, total, cpu = [], [], []
    for _ in range(int(runs)):
        for leaf in leaves:
            leaf.grad = None
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = lens_loss(inputs, variant, opts.chunk_size)
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        forward.append(middle - start)
        total.append(end - start)
        cpu.append(time.process_time() - start_cpu)
        result["loss"] = loss.item()
        del loss
    warmup = min(opts.warmup, int(runs) - 1)
    result["forward_s"], result["forward_backward_s"] = forward[warmup:], total[warmup:]
    result["forward_backward_cpu_s"] = cpu[warmup:]
    result["first_forward_backward_s"] = total[0]
    return result


# ============================================================================================ parent
def predicted_peak_mib(opts: argparse.Namespace, variant: str, vocab: int, tokens: int, hidden: int) -> float:
    """What the variant adds over the inputs: its vocabulary-sized temporaries and the head's gradient."""
    logits = tokens * vocab * 4
    head_grad = vocab * hidden * 4 * 2  # .grad and the fp32 accumulator
    if variant == "naive":
        peak = NAIVE_TEMPORARIES * opts.pairs * 2 * logits  # all positions: twice the response tokens
    elif variant == "straightforward":
        peak = STRAIGHTFORWARD_TEMPORARIES_PER_PAIR * opts.pairs * logits
    else:
        chunk = resolve_chunk_size(opts.chunk_size, vocab)
        peak = CHUNK_BLOCKS * min(tokens, chunk) * vocab * 4 + opts.pairs * tokens * hidden * 4
    return (peak + head_grad) / 2**20


def measure_point(opts, section: str, variants, vocab: int, tokens: int, hidden: int, runs: int) -> dict:
    print(f"[{section}] V={vocab} N={tokens} d={hidden}", flush=True)
    point = {"section": section, "vocab": vocab, "tokens": tokens, "hidden": hidden, "variants": {}}
    baseline = run_child(SCRIPT, opts.argv, f"baseline:{vocab}:{tokens}:{hidden}:0", opts.threads)
    if "error" in baseline:
        point["error"] = baseline["error"]
        return point
    point["baseline_max_rss_mib"] = baseline["max_rss_mib"]
    point["response_tokens"] = baseline["response_tokens"]
    for variant in variants:
        predicted = predicted_peak_mib(opts, variant, vocab, tokens, hidden)
        limit = min(opts.mem_budget_gib * 1024, 0.5 * mem_available_mib())
        entry = {"predicted_peak_mib": predicted}
        point["variants"][variant] = entry
        if predicted > limit:
            entry["skipped"] = f"predicted {predicted / 1024:.1f} GiB > limit {limit / 1024:.1f} GiB"
            print(f"  {variant:<44} skipped: {entry['skipped']}", flush=True)
            continue
        name = f"{variant}:{vocab}:{tokens}:{hidden}:{runs}"
        result = run_child(SCRIPT, opts.argv, name, opts.threads, timeout=opts.child_timeout)
        if "error" in result:
            entry["skipped"] = result["error"]
            continue
        entry.update(
            peak_mib=result["max_rss_mib"] - baseline["max_rss_mib"],
            forward_backward_s=summarize(result[CLOCK_KEYS[opts.clock]]),
            forward_backward_wall_s=summarize(result["forward_backward_s"]),
            forward_backward_cpu_s=summarize(result["forward_backward_cpu_s"]),
            forward_s=summarize(result["forward_s"]),
            first_forward_backward_s=result["first_forward_backward_s"],
            loss=result["loss"],
            load_at_start=result["load_at_start"][0],
        )
    return point


def extrapolate(points: list[dict]) -> None:
    """Fill ``peak_mib_extrapolated`` of memory points skipped as too large from a line through the measured
    ones (a variant that failed or timed out is left empty: the fused path is flat, not linear, past one chunk)."""
    groups: dict[tuple, list[dict]] = {}
    for point in points:
        if point["section"] == "memory":
            for variant, entry in point.get("variants", {}).items():
                groups.setdefault((variant, point["vocab"], point["hidden"]), []).append((point, entry))
    for entries in groups.values():
        measured = [(p["tokens"], e["peak_mib"]) for p, e in entries if "peak_mib" in e]
        if len(measured) < 2:
            continue
        intercept, slope = fit_line([n for n, _ in measured], [m for _, m in measured])
        for point, entry in entries:  # only what was not started because it would not fit
            if "peak_mib" not in entry and entry.get("skipped", "").startswith("predicted"):
                entry["peak_mib_extrapolated"] = intercept + slope * point["tokens"]
                entry["extrapolated_from_tokens"] = [n for n, _ in measured]


def peak_of(entry: dict) -> tuple[float | None, str]:
    if "peak_mib" in entry:
        return entry["peak_mib"], ""
    if "peak_mib_extrapolated" in entry:
        return entry["peak_mib_extrapolated"], " (extrapolated)"
    return None, ""


def goals(opts, points: list[dict]) -> dict:
    out: dict = {}
    memory = [p for p in points if p["section"] == "memory" and p["vocab"] == opts.memory_vocab]
    for point in memory:
        fused, _ = peak_of(point["variants"].get("fused", {}))
        straight, note = peak_of(point["variants"].get("straightforward", {}))
        if fused is not None and straight:
            suffix = "_extrapolated" if note else ""
            out[f"memory_fused_vs_straightforward_V{point['vocab']}_N{point['tokens']}{suffix}"] = (
                fused / straight
            )
    fused_peaks = [
        (p["tokens"], p["variants"]["fused"]["peak_mib"])
        for p in memory
        if "peak_mib" in p["variants"].get("fused", {}) and p["tokens"] >= 1024
    ]
    if len(fused_peaks) >= 2:
        values = [m for _, m in fused_peaks]
        tokens = "_".join(str(n) for n, _ in fused_peaks)
        out[f"memory_fused_max_over_min_N{tokens}"] = max(values) / min(values)
    for point in points:
        if point["section"] != "speed":
            continue
        v = point["variants"]
        key = f"V{point['vocab']}_N{point['tokens']}_d{point['hidden']}"
        straight = v.get("straightforward", {}).get("forward_backward_s", {}).get("median")
        for name in ("fused", "fused_compiled"):
            value = v.get(name, {}).get("forward_backward_s", {}).get("median")
            if value and straight:
                out[f"time_{name}_vs_straightforward_{key}"] = value / straight
    return out


# ============================================================================================ report
def markdown(results: dict) -> str:
    c = results["config"]
    lines = header_lines(results, "Lens term alone: naive, straightforward and fused (CPU)")
    lines += [
        f"{c['pairs']} layer pairs (student {c['student_layers']} layers, teacher {c['teacher_layers']}, teacher "
        f"hidden = {c['teacher_hidden_factor']}× student), lens divergence {c['divergence']}, inputs {c['dtype']}, "
        f"chunk size {c['chunk_size']} (tokens per chunk; `auto`: from the vocabulary, `fused.resolve_chunk_size`), half of every row prompt. Peak = the variant's `ru_maxrss` minus "
        f"that of a child that only builds the inputs; time = forward+backward in {c.get('clock', 'wall')} seconds "
        "(cpu: the worker's CPU time, robust to other jobs on a shared machine; both clocks in the JSON), median (IQR) of "
        f"{c['reps']} runs after {c['warmup']} warm-up (speed section), one run (memory section). "
        f"Variants predicted above {c['mem_budget_gib']} GiB were not started.",
        "",
        "| section | V | N | d | variant | peak over inputs | vs straightforward | fwd+bwd | vs straightforward | loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for point in results["points"]:
        straight = point.get("variants", {}).get("straightforward", {})
        s_peak, _ = peak_of(straight)
        s_time = straight.get("forward_backward_s", {}).get("median")
        for variant, e in point.get("variants", {}).items():
            peak, note = peak_of(e)
            head = f"| {point['section']} | {point['vocab']} | {point['tokens']} | {point['hidden']} | {LABELS[variant]} "
            if peak is None:
                lines.append(head + f"| not run: {e.get('skipped', '?')} | | | | |")
                continue
            t = e.get("forward_backward_s")
            time_cell = f"{t['median']:.2f} s ({t['iqr']:.2f}, n={t['n']})" if t else "—"
            time_ratio = t["median"] / s_time if t and s_time else None
            lines.append(
                head
                + f"| {peak:.0f} MiB{note} | {fmt_ratio(peak / s_peak if s_peak else None)} | {time_cell} "
                f"| {fmt_ratio(time_ratio)} | {e['loss']:.6f} |"
                if "loss" in e
                else head + f"| {peak:.0f} MiB{note} | {fmt_ratio(peak / s_peak if s_peak else None)} | | | |"
            )
    lines += ["", "Goals (ratios):", ""]
    for key, value in results["goals"].items():
        lines.append(f"- `{key}`: {value:.3f}")
    lines.append("")
    return "\n".join(lines)


# ============================================================================================ CLI
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (smoke test, 1-2 minutes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--student-layers", type=int, default=6)
    p.add_argument("--teacher-layers", type=int, default=12)
    p.add_argument("--teacher-hidden-factor", type=float, default=1.5)
    p.add_argument("--divergence", default="jsd")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and hidden states"
    )
    p.add_argument(
        "--chunk-size", type=check_chunk_size, default=DEFAULT_CHUNK_SIZE, help="tokens per chunk, or auto"
    )
    p.add_argument("--hidden", type=int, nargs="+", default=[256])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--speed-vocabs", type=int, nargs="*", default=[32000, 49152])
    p.add_argument("--speed-tokens", type=int, nargs="*", default=[512])
    p.add_argument("--memory-vocab", type=int, default=128256)
    p.add_argument("--memory-tokens", type=int, nargs="*", default=[128, 256, 1024, 2048, 4096])
    p.add_argument("--memory-variants", nargs="+", default=["straightforward", "fused"], choices=VARIANTS)
    p.add_argument(
        "--clock", choices=["cpu", "wall"], default="cpu", help="which seconds the table and goals use"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--mem-budget-gib", type=float, default=7.0, help="largest predicted peak started")
    p.add_argument("--child-timeout", type=float, default=900.0, help="seconds before a variant is abandoned")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default="", help="results go to lens_memory[_TAG].{json,md}")
    p.add_argument("--render", type=Path, default=None, help="rewrite the goals and table of a results JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.quick:
        opts.speed_vocabs, opts.speed_tokens, opts.memory_vocab = [4096], [128], 16384
        opts.memory_tokens = [128, 512]
        opts.chunk_size = 128 if opts.chunk_size == "auto" else min(opts.chunk_size, 128)
        opts.argv = [*worker_argv(argv), "--chunk-size", str(opts.chunk_size)]
    else:
        opts.argv = worker_argv(argv)
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    if opts.worker:
        emit(worker(opts, opts.worker))
        return 0
    if opts.render:  # recompute extrapolations, goals and the table of an earlier run
        results = json.loads(opts.render.read_text())
        opts.memory_vocab = results.get("memory_vocab", opts.memory_vocab)
        for point in results["points"]:
            for entry in point.get("variants", {}).values():
                entry.pop("peak_mib_extrapolated", None)
                entry.pop("extrapolated_from_tokens", None)
        extrapolate(results["points"])
        results["goals"] = goals(opts, results["points"])
        opts.render.write_text(json.dumps(results, indent=2) + "\n")
        opts.render.with_suffix(".md").write_text(markdown(results))
        return 0
    results = new_results("lens_memory.py", argv, opts.threads)
    keys = "pairs student_layers teacher_layers teacher_hidden_factor divergence dtype chunk_size warmup reps clock"
    results["config"] = {key: getattr(opts, key) for key in [*keys.split(), "mem_budget_gib"]}
    start, points = time.perf_counter(), []
    for hidden in opts.hidden:
        for vocab in opts.speed_vocabs:
            for tokens in opts.speed_tokens:
                runs = opts.warmup + opts.reps
                points.append(measure_point(opts, "speed", opts.variants, vocab, tokens, hidden, runs))
        for tokens in opts.memory_tokens:
            points.append(
                measure_point(opts, "memory", opts.memory_variants, opts.memory_vocab, tokens, hidden, 1)
            )
    extrapolate(points)
    results["points"], results["memory_vocab"] = points, opts.memory_vocab
    results["goals"] = goals(opts, points)
    results["total_wall_s"] = time.perf_counter() - start
    name = "lens_memory" + (f"_{opts.tag}" if opts.tag else "")
    write_results(opts.out_dir, name, results, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
