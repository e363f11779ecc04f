"""``distillens demo``: an offline, end-to-end DistillLens run on the built-in task suite, on a CPU.

One command, no downloads::

    distillens demo --output_dir runs/demo                  # about 4-8 minutes on 2 CPU cores
    distillens demo --output_dir runs/smoke --preset smoke  # tiny models, well under a minute

The demo

1. writes the procedural task suite (:func:`distillens_trainer.tasks.write_task_suite`) to
   ``<output_dir>/data`` and trains its byte-level BPE tokenizer (``<output_dir>/tokenizer``);
2. trains a small Llama-style teacher from scratch with plain SFT (cross-entropy only) and caches it, with
   its tokenizer, under ``<cache_dir>/teacher-<hash>`` (default cache: ``.distillens-cache`` in the parent
   folder of ``output_dir``); the hash covers the data, the tokenizer, the teacher's architecture and its
   training settings, so a second run with the same settings reuses the teacher;
3. builds the shallower and narrower initial student every method starts from: random weights, then a short
   SFT warm-up (``student_warmup_steps``, cached the same way), as in MiniLLM-style distillation where
   students start from an SFT checkpoint: reverse KL from random weights barely moves a student off its
   loss plateau;
4. trains that student three ways, with the same data order: ``sft`` (cross-entropy only), ``kd`` (reverse KL
   on the final logits only) and ``distillens`` (reverse KL plus the Jensen-Shannon logit-lens term, the
   paper's defaults);
5. evaluates the teacher, the initial student and the three students with greedy decoding on the test split
   (exact match with :func:`distillens_trainer.tasks.score_answer`, ROUGE-L with
   :func:`distillens_trainer.evaluation.rouge_l`) and measures, on the validation split, the Jensen-Shannon
   divergence between every student layer and the teacher layer at the same relative depth, read through
   each model's logit lens;
6. prints a comparison table and writes ``results.json``, ``training_curves.png``, ``lens_divergence.png``,
   ``exact_match_per_task.png``, ``training_logs.json``, the generations and the trained students to
   ``output_dir``.

The building blocks (:func:`prepare_suite`, :func:`get_teacher`, :func:`get_student_init`,
:func:`train_student`, :func:`evaluate_generation`, :func:`lens_divergence_profile`) are public so that
``benchmarks/quality.py`` can repeat the comparison over seeds. Training runs in-process with
:class:`~distillens_trainer.DistillLensTrainer`, in fp32, on the GPU when one is visible.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .divergences import DIVERGENCE_NAMES, check_divergence_name
from .files import refuse_non_empty_dir, write_json_atomic
from .tasks import DEFAULT_VOCAB_SIZE, TASK_FAMILIES, read_jsonl, resolve_tasks, score_answer

logger = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    # About 4-8 minutes on 2 CPU cores, teacher included; a second run reuses the cached teacher and student init.
    "default": {
        # Two families a 4-layer teacher learns reliably (90-98% exact match over teacher seeds) in 1200 steps;
        # adding reverse_list or list_stats makes the teacher's escape from its loss plateau a matter of luck.
        "tasks": ["copy_text", "compare_numbers"],
        "num_train": 20000,
        "num_eval": 200,
        "num_test": 200,
        "teacher_layers": 4,
        "teacher_hidden_size": 128,
        "teacher_max_steps": 1200,
        "teacher_learning_rate": 2e-3,
        "student_layers": 3,
        "student_hidden_size": 64,
        "student_warmup_steps": 1000,
        "student_warmup_learning_rate": 3e-3,
        "student_max_steps": 800,
        "student_learning_rate": 2e-3,
        "batch_size": 64,
        "lens_num_layers": 2,
        "logging_steps": 20,
    },
    # About a minute: tiny models and few steps, for tests. The numbers mean little.
    "smoke": {
        "tasks": ["copy_text", "compare_numbers", "key_lookup"],
        "num_train": 256,
        "num_eval": 24,
        "num_test": 24,
        "teacher_layers": 3,
        "teacher_hidden_size": 64,
        "teacher_max_steps": 30,
        "teacher_learning_rate": 3e-3,
        "student_layers": 2,
        "student_hidden_size": 32,
        "student_warmup_steps": 10,
        "student_warmup_learning_rate": 3e-3,
        "student_max_steps": 15,
        "student_learning_rate": 3e-3,
        "batch_size": 16,
        "lens_num_layers": 1,
        "logging_steps": 5,
    },
}

# Every student objective the demo and the quality benchmark know, as DistillLensConfig fields.
METHODS: dict[str, dict[str, Any]] = {
    "sft": {"ce_weight": 1.0, "kd_weight": 0.0, "lens_weight": 0.0},
    "kd": {"ce_weight": 0.0, "kd_weight": 1.0, "lens_weight": 0.0},
    "distillens": {"ce_weight": 0.0, "kd_weight": 1.0, "lens_divergence": "jsd"},
    "distillens_skl": {"ce_weight": 0.0, "kd_weight": 1.0, "lens_divergence": "skl"},
    "feature": {"ce_weight": 0.0, "kd_weight": 1.0, "lens_weight": 0.0, "feature_weight": 1.0},
}
DEMO_METHODS = ("sft", "kd", "distillens")
INIT_NAME = "init"
METHOD_DESCRIPTIONS = {
    "teacher": "SFT teacher (cross-entropy)",
    INIT_NAME: "the initial student every method starts from (SFT warm-up)",
    "sft": "student, cross-entropy only",
    "kd": "student, reverse KL on the final logits",
    "distillens": "student, reverse KL + JSD logit lens",
    "distillens_skl": "student, reverse KL + symmetric-KL logit lens",
    "feature": "student, reverse KL + MSE feature matching",
}
TEACHER_OBJECTIVE = {"ce_weight": 1.0, "kd_weight": 0.0, "lens_weight": 0.0}
PROMPT_TEMPLATES = ("plain", "alpaca")
CACHE_DIRNAME = ".distillens-cache"
CACHE_FORMAT = 1  # bump when the way the teacher is built changes, so old cache entries are ignored
TEACHER_INFO_NAME = "teacher_info.json"
RESULTS_NAME = "results.json"
FIGURE_NAMES = ("training_curves.png", "lens_divergence.png", "exact_match_per_task.png")
HEAD_DIM = 32
LENS_EVAL_DIVERGENCE = "jsd"


# --------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------


@dataclass
class DemoArguments:
    """Settings of ``distillens demo``; every field left unset takes the value of ``--preset``."""

    output_dir: str = field(
        metadata={
            "help": "Folder for results.json, the figures, the task suite, the tokenizer, the students and their "
            "generations. Must be empty or absent unless --overwrite_output_dir is given."
        }
    )
    preset: str = field(
        default="default",
        metadata={
            "help": "Size of the run: 'default' (a clear teacher/student gap, about 4-8 minutes on 2 CPU cores "
            "when the teacher is not cached yet) or 'smoke' (tiny models, about a minute; for tests). Every "
            "field below that is left unset takes the preset's value.",
            "choices": list(PRESETS),
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Allow a non-empty output_dir; the demo's files in it are replaced, others are kept."
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where trained teachers are cached (one teacher-<hash> folder per data/teacher setting). "
            f"Default: {CACHE_DIRNAME} in the parent folder of output_dir."
        },
    )
    methods: list[str] = field(
        default_factory=lambda: list(DEMO_METHODS),
        metadata={
            "help": "Student objectives to compare, from the same initial weights: sft (cross-entropy), kd "
            "(reverse KL on the final logits), distillens (kd + JSD logit lens), distillens_skl (kd + "
            "symmetric-KL logit lens), feature (kd + the paper's MSE feature baseline).",
            "choices": list(METHODS),
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the students' initial weights and of their data order."}
    )
    data_seed: int = field(default=0, metadata={"help": "Seed of the generated task suite."})
    teacher_seed: int = field(
        default=0, metadata={"help": "Seed of the teacher's initial weights and data order."}
    )
    tasks: list[str] | None = field(
        default=None,
        metadata={"help": f"Task families to train and test on; any of: {', '.join(TASK_FAMILIES)}."},
    )
    num_train: int | None = field(default=None, metadata={"help": "Training examples in the task suite."})
    num_eval: int | None = field(
        default=None,
        metadata={"help": "Validation examples (held out; used for the per-layer lens divergence)."},
    )
    num_test: int | None = field(
        default=None, metadata={"help": "Test examples (held out; scored with exact match and ROUGE-L)."}
    )
    vocab_size: int = field(
        default=DEFAULT_VOCAB_SIZE, metadata={"help": "Size of the suite's byte-level BPE vocabulary."}
    )
    prompt_template: str = field(
        default="plain",
        metadata={
            "help": "Prompt format for training and generation: 'plain' (instruction and input, short: fast on "
            "a CPU) or 'alpaca' (the paper's template, about 45 more tokens per example).",
            "choices": list(PROMPT_TEMPLATES),
        },
    )
    teacher_layers: int | None = field(default=None, metadata={"help": "Transformer blocks of the teacher."})
    teacher_hidden_size: int | None = field(
        default=None, metadata={"help": f"Hidden size of the teacher (a multiple of {HEAD_DIM})."}
    )
    teacher_max_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps of the teacher's SFT."}
    )
    teacher_learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate of the teacher (cosine decay)."}
    )
    student_layers: int | None = field(
        default=None, metadata={"help": "Transformer blocks of each student (fewer than the teacher's)."}
    )
    student_hidden_size: int | None = field(
        default=None,
        metadata={"help": f"Hidden size of each student (a multiple of {HEAD_DIM}, below the teacher's)."},
    )
    student_warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "SFT steps that give every method its shared initial student (cached like the teacher), as "
            "in MiniLLM-style distillation where students start from an SFT checkpoint; 0 starts the methods "
            "from random weights."
        },
    )
    student_warmup_learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate of the warm-up SFT (cosine decay)."}
    )
    student_max_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps of each method after the warm-up, whatever its objective."},
    )
    student_learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate of each method after the warm-up (cosine decay)."}
    )
    batch_size: int | None = field(default=None, metadata={"help": "Examples per optimizer step."})
    kd_divergence: str = field(
        default="rkl",
        metadata={
            "help": "Divergence on the final logits for every distilled student (the paper's: rkl; fkl is "
            "Hinton-style KD).",
            "choices": list(DIVERGENCE_NAMES),
        },
    )
    lens_weight: float = field(
        default=1.0, metadata={"help": "Weight of the logit-lens term for the distillens methods (paper: 1)."}
    )
    lens_num_layers: int | None = field(
        default=None,
        metadata={
            "help": "Student layers (evenly spaced) matched to the teacher through the lens; below "
            "student_layers. The paper uses 5 with deeper students."
        },
    )
    lens_teacher_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Teacher layer (hidden_states index) for each of the lens_num_layers student layers, in "
            "order; default: the teacher layer at the same relative depth, floor(s*L_T/L_S)."
        },
    )
    logging_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps between logged losses (the curves' resolution)."}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Prompts per generate() call."})
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Tokens generated per answer; default: the longest test answer plus 4."},
    )
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads for torch (default: the cores this process may use, at most 8). On a machine "
            "shared with other jobs, 1 is often faster."
        },
    )
    save_models: bool = field(
        default=True,
        metadata={"help": "Save each trained student (with the tokenizer) under output_dir/models/<method>."},
    )

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not one of {', '.join(PRESETS)}.")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, copy.deepcopy(value))
        self._validate()

    def _validate(self) -> None:
        if not str(self.output_dir).strip():
            raise ValueError("output_dir is empty: pass --output_dir FOLDER.")
        self.methods = list(self.methods)
        if not self.methods:
            raise ValueError(f"methods is empty: pass --methods with some of {', '.join(METHODS)}.")
        for method in self.methods:
            if method not in METHODS:
                raise ValueError(f"methods holds {method!r}; choose from {', '.join(METHODS)}.")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods={self.methods} names a method twice; list each once.")
        self.tasks = resolve_tasks(self.tasks)
        if self.prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(
                f"prompt_template={self.prompt_template!r} is not one of {', '.join(PROMPT_TEMPLATES)}."
            )
        positive = (
            "num_train", "num_eval", "num_test", "teacher_layers", "teacher_hidden_size", "teacher_max_steps",
            "student_layers", "student_hidden_size", "student_max_steps", "batch_size", "lens_num_layers",
            "logging_steps", "eval_batch_size",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        for name in ("max_new_tokens", "num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be a positive integer or unset.")
        if isinstance(self.student_warmup_steps, bool) or not isinstance(self.student_warmup_steps, int):
            raise ValueError(f"student_warmup_steps={self.student_warmup_steps!r} must be an integer >= 0.")
        if self.student_warmup_steps < 0:
            raise ValueError(f"student_warmup_steps={self.student_warmup_steps} must be >= 0.")
        for name in ("teacher_learning_rate", "student_warmup_learning_rate", "student_learning_rate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0.")
        check_divergence_name(self.kd_divergence, "kd_divergence")
        if self.lens_weight < 0:
            raise ValueError(f"lens_weight={self.lens_weight} must be >= 0.")
        for name in ("teacher_hidden_size", "student_hidden_size"):
            if getattr(self, name) % HEAD_DIM:
                raise ValueError(
                    f"{name}={getattr(self, name)} must be a multiple of {HEAD_DIM} (the head size)."
                )
        if self.student_layers < 2:
            raise ValueError(
                f"student_layers={self.student_layers} must be >= 2 so the lens has a layer to match."
            )
        if self.lens_num_layers >= self.student_layers:
            raise ValueError(
                f"lens_num_layers={self.lens_num_layers} must be below student_layers={self.student_layers} "
                "(the lens matches intermediate layers)."
            )
        if self.lens_teacher_layers is not None:
            self.lens_teacher_layers = list(self.lens_teacher_layers)
            if len(self.lens_teacher_layers) != self.lens_num_layers:
                raise ValueError(
                    f"lens_teacher_layers={self.lens_teacher_layers} has {len(self.lens_teacher_layers)} entries "
                    f"but lens_num_layers={self.lens_num_layers}: give one teacher layer per student layer."
                )
            for index in self.lens_teacher_layers:
                if not 1 <= index <= self.teacher_layers:
                    raise ValueError(
                        f"lens_teacher_layers holds {index}, but the teacher has {self.teacher_layers} layers: "
                        f"use indices in 1..{self.teacher_layers}."
                    )
        if self.student_layers > self.teacher_layers:
            raise ValueError(
                f"student_layers={self.student_layers} exceeds teacher_layers={self.teacher_layers}: the student "
                "should be the smaller model."
            )

    @property
    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        return Path(os.path.abspath(self.output_dir)).parent / CACHE_DIRNAME

    def settings(self) -> dict[str, Any]:
        """Every field, preset values filled in (what results.json records)."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------


def configure_logging() -> None:
    """INFO lines for this package when nobody configured logging (a CLI run); quiet library chatter."""
    import datasets
    import transformers

    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("distillens_trainer").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score's "Using default tokenizer."
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()  # one bar per tiny map() is noise; the training/generation bars stay


def set_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads (default: the usable cores, at most 8) and return the number."""
    if num_threads is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        num_threads = max(1, min(cores, 8))
    torch.set_num_threads(num_threads)
    return num_threads


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse a non-empty output_dir unless overwriting was asked for."""
    refuse_non_empty_dir(
        output_dir, allowed=overwrite, how_to_allow="pass --overwrite_output_dir to write into it anyway"
    )


def _stable_hash(payload: Mapping[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(parameter.numel() for parameter in {id(p): p for p in model.parameters()}.values())


@contextmanager
def _phase(name: str, timings: dict[str, float]) -> Iterator[None]:
    logger.info("[demo] %s ...", name)
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 2)
    logger.info("[demo] %s done in %.1f s", name, timings[name])


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------


@dataclass
class Suite:
    """The task suite in memory: raw splits, the tokenizer and the tokenised train/validation sets."""

    splits: dict[str, list[dict[str, str]]]
    tokenizer: Any = None
    train_dataset: Any = None
    eval_dataset: Any = None


def suite_key(args: DemoArguments) -> dict[str, Any]:
    """What determines the data and the tokenizer."""
    return {
        "tasks": list(args.tasks),
        "num_train": args.num_train,
        "num_eval": args.num_eval,
        "num_test": args.num_test,
        "data_seed": args.data_seed,
        "vocab_size": args.vocab_size,
        "prompt_template": args.prompt_template,
    }


def write_suite(args: DemoArguments, data_dir: Path) -> dict[str, list[dict[str, str]]]:
    """Write the task suite to ``data_dir`` and read its splits back."""
    from .tasks import write_task_suite

    paths = write_task_suite(
        data_dir,
        num_train=args.num_train,
        num_eval=args.num_eval,
        num_test=args.num_test,
        seed=args.data_seed,
        tasks=args.tasks,
    )
    return {split: read_jsonl(paths[split]) for split in ("train", "validation", "test")}


def prompt_of(example: Mapping[str, str], template: str) -> str:
    """The prompt a model is trained on and generates from."""
    from .data import build_prompt

    return build_prompt(example, None, template)


def tokenize_examples(examples: Sequence[Mapping[str, str]], tokenizer: Any, template: str):
    """Tokenised ``input_ids``/``attention_mask``/``labels`` rows (prompt masked) as a ``datasets.Dataset``."""
    import datasets

    from .data import tokenize_prompt_completion

    raw = datasets.Dataset.from_list(
        [{"prompt": prompt_of(example, template), "completion": example["output"]} for example in examples]
    )
    tokenized, _ = tokenize_prompt_completion(raw, tokenizer, max_length=512, max_prompt_length=256)
    return tokenized


def prepare_suite(args: DemoArguments, data_dir: Path, tokenizer: Any = None) -> Suite:
    """Write the suite, train the tokenizer unless one is given, and tokenise train and validation."""
    from .tasks import build_suite_tokenizer

    splits = write_suite(args, data_dir)
    if tokenizer is None:
        tokenizer = build_suite_tokenizer(data_dir.parent / "tokenizer", splits["train"], args.vocab_size)
    suite = Suite(splits=splits, tokenizer=tokenizer)
    suite.train_dataset = tokenize_examples(splits["train"], tokenizer, args.prompt_template)
    suite.eval_dataset = tokenize_examples(splits["validation"], tokenizer, args.prompt_template)
    return suite


# --------------------------------------------------------------------------------------------------------
# Models and training
# --------------------------------------------------------------------------------------------------------


def model_config(tokenizer: Any, num_layers: int, hidden_size: int):
    """A small Llama-style config (SwiGLU, RoPE, RMSNorm, tied embeddings) over the suite tokenizer."""
    from transformers import LlamaConfig

    heads = hidden_size // HEAD_DIM
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=(8 * hidden_size // 3 + 15) // 16 * 16,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(tokenizer: Any, num_layers: int, hidden_size: int, seed: int):
    """A randomly initialised fp32 causal LM, deterministic given ``seed``."""
    from transformers import LlamaForCausalLM, set_seed

    set_seed(seed)
    model = LlamaForCausalLM(model_config(tokenizer, num_layers, hidden_size))
    return model.to(torch.float32)


def _final_logged(log_history: Sequence[Mapping[str, Any]], key: str, last: int = 3) -> float | None:
    """Mean of the last ``last`` logged values of ``key`` (training logs only)."""
    values = [entry[key] for entry in log_history if key in entry and "train_runtime" not in entry]
    return round(statistics.fmean(values[-last:]), 5) if values else None


def train_model(
    model: torch.nn.Module,
    suite: Suite,
    *,
    objective: Mapping[str, Any],
    output_dir: Path,
    max_steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    logging_steps: int,
    lens_num_layers: int = 1,
    lens_teacher_layers: Sequence[int] | None = None,
    teacher: torch.nn.Module | None = None,
    description: str = "",
) -> dict[str, Any]:
    """Train ``model`` in place with :class:`DistillLensTrainer` and return its log and final losses."""
    from .config import DistillLensConfig
    from .data import DataCollatorForCompletionOnly
    from .trainer import DistillLensTrainer

    config = DistillLensConfig(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, max_steps // 20),
        weight_decay=0.0,
        logging_steps=logging_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        seed=seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
        lens_num_layers=lens_num_layers,
        **explicit_lens_layers(model, lens_num_layers, lens_teacher_layers),
        **objective,
    )
    needs_teacher = config.objective.needs_teacher
    trainer = DistillLensTrainer(
        model=model,
        args=config,
        train_dataset=suite.train_dataset,
        processing_class=suite.tokenizer,
        data_collator=DataCollatorForCompletionOnly(suite.tokenizer),
        teacher_model=teacher if needs_teacher else None,
    )
    if description:
        logger.info("[demo] training %s: %s, %d steps", description, dict(objective), max_steps)
    if trainer.layer_map:
        logger.info("[demo] lens layer pairs (student, teacher): %s", trainer.layer_map)
    start = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - start
    history = [dict(entry) for entry in trainer.state.log_history]
    model.eval()
    return {
        "trainer": trainer,
        "train_time_s": round(train_time, 2),
        "max_steps": max_steps,
        "objective": {key: getattr(config, key) for key in _OBJECTIVE_FIELDS},
        "layer_map": [list(pair) for pair in trainer.layer_map],
        "log_history": history,
        "final_loss": _final_logged(history, "loss"),
        "final_ce_loss": _final_logged(history, "ce_loss"),
        "final_kd_loss": _final_logged(history, "kd_loss"),
        "final_lens_loss": _final_logged(history, "lens_loss"),
        "final_feature_loss": _final_logged(history, "feature_loss"),
    }


def explicit_lens_layers(
    model: torch.nn.Module, lens_num_layers: int, lens_teacher_layers: Sequence[int] | None
) -> dict[str, list[int]]:
    """DistillLensConfig's explicit layer fields when the teacher layers are given, else nothing."""
    if lens_teacher_layers is None:
        return {}
    from .layer_map import paper_student_layers

    student_layers = paper_student_layers(model.config.num_hidden_layers, lens_num_layers)
    return {"lens_student_layers": student_layers, "lens_teacher_layers": list(lens_teacher_layers)}


_OBJECTIVE_FIELDS = (
    "ce_weight", "kd_weight", "kd_divergence", "lens_weight", "lens_divergence", "feature_weight",
    "lens_num_layers",
)  # fmt: skip


def method_objective(method: str, args: DemoArguments) -> dict[str, Any]:
    """The DistillLensConfig loss fields of a student method."""
    objective = dict(METHODS[method])
    if objective.get("kd_weight", 0) > 0:
        objective.setdefault("kd_divergence", args.kd_divergence)
    if method.startswith("distillens"):
        objective["lens_weight"] = args.lens_weight
    return objective


# --------------------------------------------------------------------------------------------------------
# The cached teacher
# --------------------------------------------------------------------------------------------------------


def teacher_key(args: DemoArguments) -> dict[str, Any]:
    """Everything the trained teacher (and its tokenizer) depends on."""
    import transformers

    return {
        "format": CACHE_FORMAT,
        "suite": suite_key(args),
        "layers": args.teacher_layers,
        "hidden_size": args.teacher_hidden_size,
        "max_steps": args.teacher_max_steps,
        "learning_rate": args.teacher_learning_rate,
        "batch_size": args.batch_size,
        "seed": args.teacher_seed,
        "transformers": transformers.__version__.split(".")[0],
    }


def teacher_cache_path(args: DemoArguments) -> Path:
    """``<cache_dir>/teacher-<hash of teacher_key>``."""
    return args.resolved_cache_dir / f"teacher-{_stable_hash(teacher_key(args))}"


def load_cached_model(path: Path) -> tuple[Any, Any, dict[str, Any]] | None:
    """(model, tokenizer, info) from a complete cache entry, or None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info_path = path / TEACHER_INFO_NAME
    if not info_path.is_file():  # written last: its absence means an incomplete entry
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        teacher = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError, json.JSONDecodeError) as error:
        logger.warning("[demo] ignoring the unreadable cache entry %s (%s)", path, error)
        return None
    teacher.eval()
    return teacher, tokenizer, info


def store_model(path: Path, model: Any, tokenizer: Any, info: Mapping[str, Any]) -> None:
    """Save into a temporary sibling folder, then rename it into place (safe against concurrent runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        write_json_atomic(staging / TEACHER_INFO_NAME, info)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (path / TEACHER_INFO_NAME).is_file():  # another run may have won the race
            raise


def get_teacher(args: DemoArguments, data_dir: Path, work_dir: Path) -> tuple[Any, Suite, dict[str, Any]]:
    """The SFT teacher and the suite: loaded from the cache when present, else trained and cached.

    Returns ``(teacher, suite, info)``; ``info["cached"]`` says whether the cache was used.
    """
    path = teacher_cache_path(args)
    cached = load_cached_model(path)
    if cached is not None:
        teacher, tokenizer, info = cached
        logger.info("[demo] reusing the cached teacher %s", path)
        suite = prepare_suite(args, data_dir, tokenizer)
        tokenizer.save_pretrained(str(data_dir.parent / "tokenizer"))
        return teacher, suite, {**info, "cached": True, "path": str(path)}

    logger.info("[demo] no cached teacher at %s: training one", path)
    suite = prepare_suite(args, data_dir)
    teacher = build_model(suite.tokenizer, args.teacher_layers, args.teacher_hidden_size, args.teacher_seed)
    run = train_model(
        teacher,
        suite,
        objective=TEACHER_OBJECTIVE,
        output_dir=work_dir / "teacher",
        max_steps=args.teacher_max_steps,
        learning_rate=args.teacher_learning_rate,
        batch_size=args.batch_size,
        seed=args.teacher_seed,
        logging_steps=args.logging_steps,
        description="the teacher (SFT)",
    )
    info = {key: value for key, value in run.items() if key != "trainer"}
    info["key"] = teacher_key(args)
    store_model(path, teacher, suite.tokenizer, info)
    logger.info("[demo] cached the teacher at %s", path)
    return teacher, suite, {**info, "cached": False, "path": str(path)}


def student_init_key(args: DemoArguments, seed: int) -> dict[str, Any]:
    """Everything the warm-started initial student depends on (the data and tokenizer, not the teacher)."""
    return {
        "format": CACHE_FORMAT,
        "suite": suite_key(args),
        "layers": args.student_layers,
        "hidden_size": args.student_hidden_size,
        "warmup_steps": args.student_warmup_steps,
        "learning_rate": args.student_warmup_learning_rate,
        "batch_size": args.batch_size,
        "seed": seed,
    }


def get_student_init(
    args: DemoArguments, suite: Suite, work_dir: Path, seed: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """The initial student every method starts from: random weights (seeded), then, unless
    ``student_warmup_steps`` is 0, that many SFT steps; the warmed-up student is cached like the teacher.

    Returns ``(student, info)``; ``info`` holds ``warmup_steps``, ``cached`` and the warm-up's losses.
    """
    seed = args.seed if seed is None else seed
    student = build_model(suite.tokenizer, args.student_layers, args.student_hidden_size, seed)
    if args.student_warmup_steps == 0:
        return student, {"warmup_steps": 0, "cached": False, "seed": seed}
    key = student_init_key(args, seed)
    path = args.resolved_cache_dir / f"student-init-{_stable_hash(key)}"
    cached = load_cached_model(path)
    if cached is not None:
        logger.info("[demo] reusing the cached warmed-up student %s", path)
        student, _, info = cached
        return student, {**info, "cached": True, "path": str(path)}
    run = train_model(
        student,
        suite,
        objective=TEACHER_OBJECTIVE,
        output_dir=work_dir / f"student-init-{seed}",
        max_steps=args.student_warmup_steps,
        learning_rate=args.student_warmup_learning_rate,
        batch_size=args.batch_size,
        seed=seed,
        logging_steps=args.logging_steps,
        description=f"the initial student (SFT warm-up, seed {seed})",
    )
    info = {key_: value for key_, value in run.items() if key_ != "trainer"}
    info |= {"key": key, "warmup_steps": args.student_warmup_steps, "seed": seed}
    store_model(path, student, suite.tokenizer, info)
    return student, {**info, "cached": False, "path": str(path)}


# --------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------


def default_max_new_tokens(examples: Sequence[Mapping[str, str]], tokenizer: Any) -> int:
    """The longest reference answer in tokens, plus room for EOS and a little overshoot."""
    lengths = [len(tokenizer(example["output"], add_special_tokens=False).input_ids) for example in examples]
    return max(lengths, default=8) + 4


def _generate(model: Any, tokenizer: Any, prompts: list[str], **kwargs: Any) -> list[str]:
    """``evaluation.generate_responses`` with only the keyword arguments its signature accepts."""
    from .evaluation import generate_responses

    accepted = inspect.signature(generate_responses).parameters
    return generate_responses(model, tokenizer, prompts, **{k: v for k, v in kwargs.items() if k in accepted})


def evaluate_generation(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, str]],
    *,
    prompt_template: str,
    batch_size: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """Greedy answers to ``examples`` scored with exact match and ROUGE-L (both 0-100), overall and per task."""
    from .evaluation import rouge_l

    prompts = [prompt_of(example, prompt_template) for example in examples]
    answers = _generate(
        model,
        tokenizer,
        prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_prompt_length=256,
        do_sample=False,
        no_repeat_ngram_size=0,
        seed=0,
        show_progress=True,
    )
    records = []
    for example, answer in zip(examples, answers):
        records.append(
            {
                "task": example["task"],
                "instruction": example["instruction"],
                "input": example["input"],
                "reference": example["output"],
                "generation": answer,
                "exact_match": 100.0 if score_answer(answer, example["output"]) else 0.0,
                "rougeL": rouge_l(answer, [example["output"]]),
            }
        )
    per_task: dict[str, dict[str, float]] = {}
    for task in dict.fromkeys(example["task"] for example in examples):
        rows = [record for record in records if record["task"] == task]
        per_task[task] = {
            "exact_match": round(statistics.fmean(row["exact_match"] for row in rows), 2),
            "rougeL": round(statistics.fmean(row["rougeL"] for row in rows), 2),
            "n": len(rows),
        }
    return {
        "exact_match": round(statistics.fmean(row["exact_match"] for row in records), 2),
        "rougeL": round(statistics.fmean(row["rougeL"] for row in records), 2),
        "num_examples": len(records),
        "per_task": dict(sorted(per_task.items())),
        "records": records,
    }


@torch.no_grad()
def lens_divergence_profile(
    student: Any,
    teacher: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    batch_size: int = 64,
    divergence: str = LENS_EVAL_DIVERGENCE,
) -> dict[str, Any]:
    """Mean per-token divergence, on response tokens, between each student layer and the teacher layer at the
    same relative depth, both read through their own logit lens (final norm + LM head).

    Returns ``{"pairs": [[s, t], ...], "divergence": [...], "final": ..., "student_ce": ..., "teacher_ce": ...}``;
    the last pair is the two models' final layers, i.e. the divergence of their output distributions.
    """
    from .data import DataCollatorForCompletionOnly
    from .layer_map import proportional_teacher_layer
    from .lens import LogitLens
    from .objective import ObjectiveSpec, distillens_loss
    from .teacher import shared_vocab_size

    student_lens, teacher_lens = LogitLens(student), LogitLens(teacher)
    pairs = [
        (layer, proportional_teacher_layer(layer, student_lens.num_layers, teacher_lens.num_layers))
        for layer in range(1, student_lens.num_layers + 1)
    ]
    spec = ObjectiveSpec(
        ce_weight=1.0, kd_weight=1.0, kd_divergence=divergence, lens_weight=1.0, lens_divergence=divergence
    )
    vocab_size = shared_vocab_size(student, teacher, tokenizer)
    collator = DataCollatorForCompletionOnly(tokenizer)
    was_training = student.training, teacher.training
    student.eval()
    teacher.eval()
    device = next(student.parameters()).device
    sums: dict[str, float] = {}
    teacher_ce, num_tokens = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[index] for index in range(start, min(start + batch_size, len(dataset)))])
        batch = {key: value.to(device) for key, value in batch.items()}
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        student_out = student(**inputs, output_hidden_states=True, use_cache=False)
        teacher_out = teacher(**inputs, output_hidden_states=True, use_cache=False)
        result = distillens_loss(
            student_out.logits,
            teacher_out.logits,
            batch["labels"],
            spec,
            vocab_size=vocab_size,
            student_hidden_states=student_out.hidden_states,
            teacher_hidden_states=teacher_out.hidden_states,
            student_lens=student_lens,
            teacher_lens=teacher_lens,
            layer_map=pairs,
        )
        teacher_ce += float(
            distillens_loss(
                teacher_out.logits, None, batch["labels"], ObjectiveSpec(ce_weight=1.0, kd_weight=0.0)
            ).term_sums["ce_loss"]
        )
        for name, value in result.term_sums.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        num_tokens += result.num_tokens
    student.train(was_training[0])
    teacher.train(was_training[1])
    tokens = max(num_tokens, 1)
    return {
        "divergence_name": divergence,
        "pairs": [list(pair) for pair in pairs],
        "divergence": [round(sums[f"lens/s{s}_t{t}"] / tokens, 5) for s, t in pairs],
        "final": round(sums["kd_loss"] / tokens, 5),
        "student_ce": round(sums["ce_loss"] / tokens, 5),
        "teacher_ce": round(teacher_ce / tokens, 5),
        "num_tokens": num_tokens,
    }


# --------------------------------------------------------------------------------------------------------
# Figures and the table
# --------------------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        logger.warning(
            "[demo] matplotlib is not installed (pip install 'distillens-trainer[demo]'): no figures."
        )
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_COLORS = {
    "teacher": "#444444",
    INIT_NAME: "#bbbbbb",
    "sft": "#1f77b4",
    "kd": "#ff7f0e",
    "distillens": "#2ca02c",
    "distillens_skl": "#9467bd",
    "feature": "#8c564b",
}


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [
        (entry["step"], entry[key]) for entry in history if key in entry and "train_runtime" not in entry
    ]
    return [step for step, _ in points], [value for _, value in points]


def plot_training_curves(runs: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """Three panels: each student's own objective, its response-token CE, and the distillation terms."""
    plt = _pyplot()
    if plt is None:
        return None
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, run in runs.items():
        color = _COLORS.get(name)
        history = run["log_history"]
        axes[0].plot(*_series(history, "loss"), label=name, color=color)
        axes[1].plot(*_series(history, "ce_loss"), label=name, color=color)
        for key, style in (("kd_loss", "-"), ("lens_loss", "--"), ("feature_loss", ":")):
            steps, values = _series(history, key)
            if steps and run["objective"].get(key.replace("_loss", "_weight"), 0) > 0:
                axes[2].plot(steps, values, style, label=f"{name}: {key}", color=color)
    titles = (
        "training objective (each method's own)",
        "cross-entropy on response tokens",
        "distillation terms (per token)",
    )
    for axis, title in zip(axes, titles):
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_lens_divergence(
    profiles: Mapping[str, Mapping[str, Any]], lens_layers: Sequence[int], path: Path
) -> Path | None:
    """Per-layer logit-lens divergence between each student and the teacher."""
    plt = _pyplot()
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for name, profile in profiles.items():
        layers = [s for s, _ in profile["pairs"]]
        style = "o--" if name == INIT_NAME else "o-"
        axis.plot(layers, profile["divergence"], style, label=name, color=_COLORS.get(name))
    first = next(iter(profiles.values()))
    labels = [f"s{s}\u2192t{t}" + (" *" if s in lens_layers else "") for s, t in first["pairs"]]
    axis.set_xticks([s for s, _ in first["pairs"]], labels)
    axis.set_yscale("log")
    axis.set_xlabel("student layer \u2192 teacher layer (* = matched by the lens loss; last = output)")
    axis.set_ylabel(f"{first['divergence_name'].upper()} per response token")
    axis.set_title("Logit-lens divergence from the teacher, held-out data")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_per_task(evaluations: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """Grouped bars: exact match per task family and model."""
    plt = _pyplot()
    if plt is None:
        return None
    names = list(evaluations)
    tasks = list(next(iter(evaluations.values()))["per_task"])
    width = 0.8 / len(names)
    figure, axis = plt.subplots(figsize=(max(7.0, 1.3 * len(tasks) + 2), 4.5))
    for index, name in enumerate(names):
        values = [evaluations[name]["per_task"][task]["exact_match"] for task in tasks]
        positions = [task_index + (index - (len(names) - 1) / 2) * width for task_index in range(len(tasks))]
        axis.bar(positions, values, width, label=name, color=_COLORS.get(name))
    axis.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    axis.set_ylabel("exact match (%)")
    axis.set_ylim(0, 100)
    axis.set_title("Greedy exact match per task family (test split)")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def format_table(models: Mapping[str, Mapping[str, Any]]) -> str:
    """The comparison table printed at the end of the demo (Markdown)."""
    header = "| model | params | layers x hidden | steps | train s | exact match | ROUGE-L | mean lens JSD | output JSD |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, entry in models.items():
        profile = entry.get("lens_profile")
        mean_jsd = f"{statistics.fmean(profile['divergence']):.4f}" if profile else "-"
        final_jsd = f"{profile['final']:.4f}" if profile else "-"
        train_time = "cached" if entry.get("cached") else f"{entry.get('train_time_s', 0):.0f}"
        lines.append(
            f"| {name} | {entry['params'] / 1e6:.2f}M | {entry['num_layers']} x {entry['hidden_size']} | "
            f"{entry['max_steps']} | {train_time} | {entry['exact_match']:.1f} | {entry['rougeL']:.1f} | "
            f"{mean_jsd} | {final_jsd} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------------------


def train_student(
    method: str,
    initial_student: torch.nn.Module,
    teacher: torch.nn.Module,
    suite: Suite,
    args: DemoArguments,
    output_dir: Path,
    seed: int | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A copy of ``initial_student`` trained with ``method``; returns ``(student, run info)``."""
    student = copy.deepcopy(initial_student)
    run = train_model(
        student,
        suite,
        objective=method_objective(method, args),
        output_dir=output_dir,
        max_steps=args.student_max_steps,
        learning_rate=args.student_learning_rate,
        batch_size=args.batch_size,
        seed=args.seed if seed is None else seed,
        logging_steps=args.logging_steps,
        lens_num_layers=args.lens_num_layers,
        lens_teacher_layers=args.lens_teacher_layers,
        teacher=teacher,
        description=f"student '{method}'",
    )
    return student, run


def _model_entry(model: Any, evaluation: Mapping[str, Any], run: Mapping[str, Any]) -> dict[str, Any]:
    config = model.config
    entry = {
        "exact_match": evaluation["exact_match"],
        "rougeL": evaluation["rougeL"],
        "per_task": evaluation["per_task"],
        "params": count_parameters(model),
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
    }
    entry.update({key: value for key, value in run.items() if key not in ("trainer", "log_history", "key")})
    return entry


def _write_generations(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8"
    )


def run_demo(args: DemoArguments) -> dict[str, Any]:
    """Run the whole demo (see the module docstring) and return what ``results.json`` holds."""
    check_output_dir(args.output_dir, args.overwrite_output_dir)
    configure_logging()
    start = time.perf_counter()
    timings: dict[str, float] = {}
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    threads = set_threads(args.num_threads)
    logger.info(
        "[demo] preset %r, %d torch threads, output in %s, cache in %s",
        args.preset,
        threads,
        output_dir,
        args.resolved_cache_dir,
    )

    with _phase("task suite and teacher (cached, or SFT from scratch)", timings):
        teacher, suite, teacher_info = get_teacher(args, output_dir / "data", output_dir / "models")
    tokenizer = suite.tokenizer
    with _phase(f"initial student ({args.student_warmup_steps} SFT warm-up steps, cached)", timings):
        initial_student, init_info = get_student_init(args, suite, output_dir / "models")

    runs: dict[str, dict[str, Any]] = {}
    students: dict[str, torch.nn.Module] = {}
    for method in args.methods:
        with _phase(f"student '{method}'", timings):
            student, run = train_student(
                method, initial_student, teacher, suite, args, output_dir / "models" / method
            )
            if args.save_models:
                run["trainer"].save_model(str(output_dir / "models" / method))
                run["path"] = str(output_dir / "models" / method)
            students[method], runs[method] = student, run

    max_new_tokens = args.max_new_tokens or default_max_new_tokens(suite.splits["test"], tokenizer)
    evaluated = {"teacher": teacher, INIT_NAME: initial_student, **students}
    evaluations: dict[str, dict[str, Any]] = {}
    with _phase(
        f"greedy generation on {len(suite.splits['test'])} test prompts, {len(evaluated)} models", timings
    ):
        for name, model in evaluated.items():
            evaluations[name] = evaluate_generation(
                model,
                tokenizer,
                suite.splits["test"],
                prompt_template=args.prompt_template,
                batch_size=args.eval_batch_size,
                max_new_tokens=max_new_tokens,
            )
            _write_generations(output_dir / "generations" / f"{name}.jsonl", evaluations[name]["records"])

    profiles: dict[str, dict[str, Any]] = {}
    with _phase("per-layer logit-lens divergence on the validation split", timings):
        for name, model in evaluated.items():
            if name != "teacher":
                profiles[name] = lens_divergence_profile(
                    model, teacher, tokenizer, suite.eval_dataset, batch_size=args.eval_batch_size
                )

    models: dict[str, dict[str, Any]] = {
        "teacher": {
            **_model_entry(teacher, evaluations["teacher"], teacher_info),
            "description": METHOD_DESCRIPTIONS["teacher"],
        }
    }
    for method in students:
        models[method] = {
            **_model_entry(students[method], evaluations[method], runs[method]),
            "description": METHOD_DESCRIPTIONS[method],
            "lens_profile": profiles[method],
        }
    student_init = {
        **_model_entry(initial_student, evaluations[INIT_NAME], init_info),
        "max_steps": args.student_warmup_steps,
        "description": METHOD_DESCRIPTIONS[INIT_NAME],
        "lens_profile": profiles[INIT_NAME],
    }

    lens_layers = next((run["layer_map"] for run in runs.values() if run["layer_map"]), [])
    figures: dict[str, str] = {}
    with _phase("figures", timings):
        for name, plotted in (
            ("training_curves.png", plot_training_curves(runs, output_dir / "training_curves.png")),
            (
                "lens_divergence.png",
                plot_lens_divergence(
                    profiles, [s for s, _ in lens_layers], output_dir / "lens_divergence.png"
                ),
            ),
            ("exact_match_per_task.png", plot_per_task(evaluations, output_dir / "exact_match_per_task.png")),
        ):
            if plotted is not None:
                figures[name] = str(plotted)

    table = format_table({"teacher": models["teacher"], INIT_NAME: student_init} | models)
    results = {
        "preset": args.preset,
        "teacher_cached": bool(teacher_info["cached"]),
        "teacher_path": teacher_info["path"],
        "student_init_cached": bool(init_info["cached"]),
        "torch_threads": threads,
        "max_new_tokens": max_new_tokens,
        "lens_layer_map": lens_layers,
        "models": models,
        "student_init": student_init,
        "figures": figures,
        "timings_s": timings,
        "total_time_s": round(time.perf_counter() - start, 2),
        "settings": args.settings(),
        "table": table,
    }
    write_json_atomic(output_dir / RESULTS_NAME, results)
    histories = {name: run["log_history"] for name, run in runs.items()}
    write_json_atomic(output_dir / "training_logs.json", histories)
    print(f"\nDistillLens demo ({args.preset} preset), test split of {len(suite.splits['test'])} prompts:\n")
    print(table)
    print(f"\nResults: {output_dir / RESULTS_NAME}; figures: {', '.join(figures) or 'none'}")
    cached = "cached" if results["teacher_cached"] else "trained"
    print(f"Total time {results['total_time_s']:.0f} s (teacher {cached}).")
    return results
