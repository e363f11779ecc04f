"""Settings of ``distillens demo``: the presets, the student methods, the demo's constants and
:class:`DemoArguments`."""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillens_trainer.config import DistillLensConfig
from distillens_trainer.data.arguments import PROMPT_TEMPLATES
from distillens_trainer.files import overwrite_output_dir_field
from distillens_trainer.loss.divergences import check_divergence_name
from distillens_trainer.loss.layer_map import LayerMapFields, paper_student_layers, resolve_run_layer_map

from .data.suite import DEFAULT_VOCAB_SIZE
from .data.tasks import TASK_FAMILIES, resolve_tasks

PRESETS: dict[str, dict[str, Any]] = {
    # About 4 minutes on 2 CPU cores, teacher included (measured 4 min 07 s); a second run reuses the cached
    # teacher and initial student (about 2 minutes).
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
    # About a minute: tiny models and few steps. It checks the plumbing; its models score about 0.
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
    # On-policy (GKD-style): every optimizer window trains on completions the student samples for its prompts
    # (lmbda=1), or half of them (lmbda=0.5, the mixed ablation); see training.method_objective for their length.
    "kd_onpolicy": {"ce_weight": 0.0, "kd_weight": 1.0, "lens_weight": 0.0, "lmbda": 1.0},
    "distillens_onpolicy": {"ce_weight": 0.0, "kd_weight": 1.0, "lens_divergence": "jsd", "lmbda": 1.0},
    "kd_mixed": {"ce_weight": 0.0, "kd_weight": 1.0, "lens_weight": 0.0, "lmbda": 0.5},
    "distillens_mixed": {"ce_weight": 0.0, "kd_weight": 1.0, "lens_divergence": "jsd", "lmbda": 0.5},
    # distillens trained from a teacher cache instead of the teacher model: "teacher_cache" is no config field but the
    # cache's settings, which training turns into a cache built once per teacher, suite, settings and layer map (see
    # training.get_teacher_signals). An fp32 hidden cache trains as distillens up to float rounding; the top-k ones
    # (bf16) measure what keeping k teacher log-probabilities per token and layer costs.
    "distillens_hidden": {
        "ce_weight": 0.0, "kd_weight": 1.0, "lens_divergence": "jsd",
        "teacher_cache": {"mode": "hidden", "dtype": "float32"},
    },
    "distillens_topk8": {
        "ce_weight": 0.0, "kd_weight": 1.0, "lens_divergence": "jsd",
        "teacher_cache": {"mode": "topk", "top_k": 8, "dtype": "bfloat16"},
    },
    "distillens_topk32": {
        "ce_weight": 0.0, "kd_weight": 1.0, "lens_divergence": "jsd",
        "teacher_cache": {"mode": "topk", "top_k": 32, "dtype": "bfloat16"},
    },
    "distillens_topk128": {
        "ce_weight": 0.0, "kd_weight": 1.0, "lens_divergence": "jsd",
        "teacher_cache": {"mode": "topk", "top_k": 128, "dtype": "bfloat16"},
    },
}  # fmt: skip
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
    "kd_onpolicy": "student, reverse KL on the final logits, on its own sampled completions (lmbda 1)",
    "distillens_onpolicy": "student, reverse KL + JSD logit lens, on its own sampled completions (lmbda 1)",
    "kd_mixed": "student, reverse KL on the final logits, half the windows on its own completions (lmbda 0.5)",
    "distillens_mixed": "student, reverse KL + JSD logit lens, half the windows on its own completions (lmbda 0.5)",
    "distillens_hidden": "student, reverse KL + JSD logit lens, from an fp32 cache of the teacher's hidden states",
    "distillens_topk8": "student, reverse KL + JSD logit lens, from a cache of the teacher's top-8 log-probs (bf16)",
    "distillens_topk32": "student, reverse KL + JSD logit lens, from a cache of the teacher's top-32 log-probs (bf16)",
    "distillens_topk128": "student, reverse KL + JSD logit lens, from a cache of the teacher's top-128 log-probs (bf16)",
}
TEACHER_OBJECTIVE = {"ce_weight": 1.0, "kd_weight": 0.0, "lens_weight": 0.0}
# The suite tokenizer has no chat template: the demo offers the library's prompt formats that need none.
DEMO_PROMPT_TEMPLATES: tuple[str, ...] = tuple(name for name in PROMPT_TEMPLATES if name != "chat")
CACHE_DIRNAME = ".distillens-cache"
CACHE_FORMAT = 1  # bump when the way the teacher is built changes, so old cache entries are ignored
TEACHER_INFO_NAME = "teacher_info.json"
RESULTS_NAME = "results.json"
FIGURE_NAMES = ("training_curves.png", "lens_divergence.png", "exact_match_per_task.png")
HEAD_DIM = 32
LENS_EVAL_DIVERGENCE = "jsd"
DEMO_MARKER_NAME = ".distillens-demo"  # marks a folder the demo wrote, so a second run may reuse it
SMOKE_NOTE = (
    "The smoke preset checks the plumbing: its models are too small and too briefly trained to answer, so "
    "scores near 0 are expected. Drop --preset smoke for the real comparison (about 4 minutes)."
)
# Test exact match, min and max over the 5 student seeds of benchmarks/results/quality.json (the default preset,
# seeds 0-4, the same cached teacher); tests/demo/test_demo.py checks these against that file.
BENCHMARK_SEEDS = 5
BENCHMARK_EXACT_MATCH_RANGES: dict[str, tuple[float, float]] = {
    "teacher": (94.5, 94.5),
    "init": (16.5, 47.5),
    "sft": (47.0, 70.0),
    "kd": (27.5, 57.0),
    "distillens": (27.0, 56.0),
    "distillens_skl": (39.5, 61.0),
    "feature": (22.0, 51.5),
}
# Fields that change nothing in a model's scores (or only pick which of the benchmarked seeds/methods run).
RUN_ONLY_FIELDS = (
    "output_dir", "preset", "overwrite_output_dir", "cache_dir", "methods", "seed", "eval_batch_size",
    "num_threads", "save_models",
)  # fmt: skip


def library_field(name: str, note: str = "") -> Any:
    """A :class:`DemoArguments` field that is :class:`DistillLensConfig`'s field ``name`` for the demo's students:
    its default, help and choices come from the library's declaration, the help followed by ``note`` (what the
    demo applies it to)."""
    source = next(item for item in dataclasses.fields(DistillLensConfig) if item.name == name)
    metadata = dict(source.metadata)
    metadata["help"] = f"{metadata['help']} {note}".strip()
    if source.default_factory is not dataclasses.MISSING:
        return field(default_factory=source.default_factory, metadata=metadata)
    return field(default=copy.deepcopy(source.default), metadata=metadata)


@dataclass
class DemoArguments:
    """Settings of ``distillens demo``; every field left unset takes the value of ``--preset``."""

    output_dir: str = field(
        metadata={
            "help": "Folder for results.json, the figures, the task suite, the tokenizer, the models and their "
            "generations. Must be absent, empty or an earlier demo's output folder (which is replaced) unless "
            "--overwrite_output_dir is given."
        }
    )
    preset: str = field(
        default="default",
        metadata={
            "help": "Size of the run: 'default' (a clear teacher/student gap, about 4 minutes on 2 CPU cores "
            "when the teacher is not cached yet) or 'smoke' (tiny models, about a minute: it checks the plumbing, "
            "its models score about 0). Every field below that is left unset takes the preset's value.",
            "choices": list(PRESETS),
        },
    )
    overwrite_output_dir: bool = overwrite_output_dir_field(
        "the demo's files in it are replaced, others are kept"
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where trained teachers are cached (one teacher-<hash> folder per data/teacher setting), with "
            "the initial students and the teacher caches of the cache methods (teacher-signals-<hash>). "
            f"Default: {CACHE_DIRNAME} in the parent folder of output_dir."
        },
    )
    methods: list[str] = field(
        default_factory=lambda: list(DEMO_METHODS),
        metadata={
            "help": "Student objectives to compare, from the same initial weights: sft (cross-entropy), kd "
            "(reverse KL on the final logits), distillens (kd + JSD logit lens), distillens_skl (kd + "
            "symmetric-KL logit lens), feature (kd + the paper's MSE feature baseline); kd_onpolicy and "
            "distillens_onpolicy train on completions the student samples for the training prompts (lmbda=1), "
            "kd_mixed and distillens_mixed on half of the optimizer windows (lmbda=0.5); distillens_hidden, "
            "distillens_topk8, distillens_topk32 and distillens_topk128 are distillens from a teacher cache "
            "(fp32 hidden states, or the teacher's top-k log-probabilities in bf16) built once in cache_dir.",
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
            "choices": list(DEMO_PROMPT_TEMPLATES),
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
    # The students' objective fields, as DistillLensConfig declares them.
    kd_divergence: str = library_field(
        "kd_divergence", "The demo: every distilled student (paper: rkl; fkl is Hinton-style KD)."
    )
    lens_weight: float = library_field("lens_weight", "The demo: the distillens methods (paper: 1).")
    lens_num_layers: int | None = field(
        default=None,
        metadata={
            "help": "Student layers (evenly spaced) matched to the teacher through the lens; below "
            "student_layers. The paper uses 5 with deeper students."
        },
    )
    lens_teacher_layers: list[int] | None = library_field(  # noqa: RUF009 (library_field returns a field)
        "lens_teacher_layers", "The demo: one per lens_num_layers evenly spaced student layer, in order."
    )
    logging_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps between logged losses (the curves' resolution)."}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Prompts per generate() call."})
    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Tokens generated per test answer (greedy scoring); default: the longest test answer plus 4. "
            "The on-policy methods' training completions get the longest training answer plus 4."
        },
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
        metadata={
            "help": "Save the teacher, the initial student and each trained student (with the tokenizer and "
            "distillens.json, which records the prompt format) under output_dir/models/<name>."
        },
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
        if self.prompt_template not in DEMO_PROMPT_TEMPLATES:
            raise ValueError(
                f"prompt_template={self.prompt_template!r} is not one of {', '.join(DEMO_PROMPT_TEMPLATES)}."
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
            student_layers = paper_student_layers(self.student_layers, self.lens_num_layers)
            # the trainer's own check, here so a bad index fails before the teacher is trained
            resolve_run_layer_map(
                self.student_layers,
                self.teacher_layers,
                LayerMapFields(student_layers=student_layers, teacher_layers=self.lens_teacher_layers),
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

    def is_benchmarked(self) -> bool:
        """True when every setting that shapes the scores is the default preset's, which
        benchmarks/results/quality.json repeated over seeds."""
        if self.preset != "default":
            return False
        reference = DemoArguments(output_dir=self.output_dir)
        return all(
            getattr(self, item.name) == getattr(reference, item.name)
            for item in dataclasses.fields(self)
            if item.name not in RUN_ONLY_FIELDS
        )

    def settings(self) -> dict[str, Any]:
        """Every field, preset values filled in (what results.json records)."""
        return dataclasses.asdict(self)
