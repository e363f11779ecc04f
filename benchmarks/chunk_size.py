"""One fused job (a lens pair or the output term) forward + backward at several chunk sizes, eager and compiled.

What ``head_chunk_size="auto"`` and ``head_compile`` rest on: N response tokens of random head inputs (student
width d, teacher width 1.5 d), SmolLM2's shapes by default (V = 49,152, d = 576), one ``FusedJob`` through
``fused_head_loss`` and ``.backward()``, timed at every chunk size, then under ``torch.compile`` (first call apart:
the compilation), beside the *floor*: the job's four matrix products alone (teacher head, student head, the two
gradient products), which no exact implementation can skip. Medians of ``--reps`` after one warm-up, in one
process (the rows share the machine's state), CPU and wall seconds::

    PYTHONPATH=src python benchmarks/chunk_size.py                    # ~3 minutes on 2 cores
    PYTHONPATH=src python benchmarks/chunk_size.py --vocab 128256 --tag v128k
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import header_lines, new_results, setup_torch, write_results

from distillens_trainer.loss.fused import FusedJob, HeadTeacher, fused_head_loss, resolve_chunk_size
from distillens_trainer.loss.heads import LinearHead

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def timed(fn, reps: int) -> dict:
    """Median wall and CPU seconds of ``fn()`` over ``reps`` runs after one warm-up; the warm-up's own time."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    wall, cpu = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "first_call_s": first}


def build(opts: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(0)
    d, d_t, vocab, n = opts.hidden, int(opts.hidden * 1.5), opts.vocab, opts.tokens
    return {
        "student_head": LinearHead(torch.randn(vocab, d, generator=generator) * d**-0.5),
        "teacher_head": LinearHead(torch.randn(vocab, d_t, generator=generator) * d_t**-0.5),
        "student_input": torch.randn(n, d, generator=generator),
        "teacher_input": torch.randn(n, d_t, generator=generator),
    }


def fused_step(inputs: dict, divergence: str, chunk_size: int | str, compiled: bool):
    student_input = inputs["student_input"].detach().requires_grad_(True)
    job = FusedJob(
        student_input, HeadTeacher(inputs["teacher_input"], inputs["teacher_head"]), divergence, weight=1.0
    )
    total, _ = fused_head_loss(
        inputs["student_head"], [job], vocab_size=inputs["student_head"].weight.shape[0],
        chunk_size=chunk_size, compile_math=compiled,
    )  # fmt: skip
    total.backward()


def floor_step(inputs: dict, chunk: int, buffers: dict):
    """The four products per chunk, nothing else, into buffers allocated once (the least an exact job costs)."""
    w_s, w_t = inputs["student_head"].weight, inputs["teacher_head"].weight
    grad_w = buffers["grad_w"].zero_()
    for start in range(0, inputs["student_input"].shape[0], chunk):
        h_s, h_t = (
            inputs["student_input"][start : start + chunk],
            inputs["teacher_input"][start : start + chunk],
        )
        rows = h_s.shape[0]
        torch.mm(h_t, w_t.t(), out=buffers["teacher"][:rows])
        g = torch.mm(h_s, w_s.t(), out=buffers["student"][:rows])
        torch.mm(g, w_s, out=buffers["grad_h"][:rows])
        grad_w.addmm_(g.t(), h_s)


def run(opts: argparse.Namespace) -> dict:
    setup_torch(opts.threads)
    results = new_results("chunk_size.py", opts.argv, opts.threads)
    auto = resolve_chunk_size("auto", opts.vocab)
    results["config"] = {k: getattr(opts, k) for k in ("vocab", "hidden", "tokens", "reps", "divergences")}
    results["config"]["auto_chunk"] = auto
    inputs = build(opts)
    rows = []
    sizes = sorted({*opts.chunk_sizes, auto})
    for divergence in opts.divergences:
        for chunk in sizes:
            row = {"divergence": divergence, "chunk": chunk, "compiled": False}
            row |= timed(partial(fused_step, inputs, divergence, chunk, False), opts.reps)
            rows.append(row)
            print(row, flush=True)
        if opts.compile:
            row = {"divergence": divergence, "chunk": auto, "compiled": True}
            row |= timed(partial(fused_step, inputs, divergence, auto, True), opts.reps)
            rows.append(row)
            print(row, flush=True)
    floor = {"divergence": "floor", "chunk": auto, "compiled": False}
    vocab, d = inputs["student_head"].weight.shape
    buffers = {
        "teacher": torch.empty(auto, vocab),
        "student": torch.empty(auto, vocab),
        "grad_h": torch.empty(auto, d),
        "grad_w": torch.empty(vocab, d),
    }
    floor |= timed(partial(floor_step, inputs, auto, buffers), opts.reps)
    rows.append(floor)
    print(floor, flush=True)
    results["rows"] = rows
    return results


def markdown(results: dict) -> str:
    c = results["config"]
    floor = next(r for r in results["rows"] if r["divergence"] == "floor")
    lines = header_lines(results, "One fused job, forward + backward, by chunk size")
    lines += [
        f"N = {c['tokens']} response tokens, V = {c['vocab']}, student width {c['hidden']}, teacher width "
        f"{int(c['hidden'] * 1.5)}, fp32; median of {c['reps']} after one warm-up (its time: *first call*), one "
        f"process. `auto` = {c['auto_chunk']} tokens here. Floor: the four head products alone, at the auto chunk, into buffers allocated once.",
        "",
        "| divergence | chunk | compiled | CPU s | wall s | wall vs floor | first call s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        label = f"{r['chunk']}" + (" (auto)" if r["chunk"] == c["auto_chunk"] else "")
        lines.append(
            f"| {r['divergence']} | {label} | {'yes' if r['compiled'] else 'no'} | {r['cpu_s']:.3f} | "
            f"{r['wall_s']:.3f} | {r['wall_s'] / floor['wall_s']:.2f}× | {r['first_call_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--divergences", nargs="+", default=["jsd", "rkl"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default="", help="results go to chunk_size[_TAG].{json,md}")
    opts = p.parse_args(argv)
    opts.argv = argv
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(list(sys.argv[1:] if argv is None else argv))
    results = run(opts)
    name = "chunk_size" + (f"_{opts.tag}" if opts.tag else "")
    write_results(opts.out_dir, name, results, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
