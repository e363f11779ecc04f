"""``DistillLensConfig``: ``transformers.TrainingArguments`` plus the DistillLens objective's settings."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import TrainingArguments

from .distributed.fsdp import check_fsdp_config
from .loss.divergences import (
    DIVERGENCE_NAMES,
    DIVERGENCES,
    PAPER_KD_DIVERGENCE,
    PAPER_LENS_DIVERGENCE,
    describe_divergences,
)
from .loss.layer_map import LAYER_MAPS, check_distinct_layer_lists, check_layer_map_choice
from .loss.spec import DEFAULT_CHUNK_SIZE, ObjectiveSpec, check_chunk_size
from .models.facts import DTYPE_NAMES, check_dtype_name
from .models.loading import split_gguf_path

# Renamed fields, old -> new: the old name still works (with a FutureWarning) until the next minor release.
DEPRECATED_FIELDS: dict[str, str] = {"lens_chunk_size": "head_chunk_size", "lens_compile": "head_compile"}

# nonfinite_policy: what a non-finite loss, term or gradient does (distillens_trainer.trainer.nonfinite)
NONFINITE_POLICIES: tuple[str, ...] = ("stop", "skip")


@dataclass
class DistillLensConfig(TrainingArguments):
    """Training arguments for :class:`~distillens_trainer.DistillLensTrainer`.

    Defaults are the paper's: no CE, reverse KL on the final logits, Jensen-Shannon (β=½) through the
    logit lens on 5 evenly spaced layer pairs, with the model's own final norm applied. In Python the teacher
    may also be passed to the trainer as a model (``DistillLensTrainer(teacher_model=...)``); another
    ``TrainingArguments`` (a TRL ``SFTConfig``, ...) converts with :meth:`from_training_arguments`.
    """

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Teacher: a local model folder, a hub id or a .gguf file, with the student's tokenizer. Not "
            "needed for plain SFT (--ce_weight 1 --kd_weight 0 --lens_weight 0)."
        },
    )
    teacher_gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "Load the teacher from this GGUF file inside teacher_model_name_or_path (a folder or hub "
            "id), de-quantised; its tokenizer is read from the same file. Needs the gguf extra."
        },
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "Distil from a teacher cache written by 'distillens cache-teacher' (its output_dir) instead of "
            "running the teacher: no teacher model is built (a hidden cache loads only the teacher's LM head). Every "
            "training and evaluation row must be in the cache, matched by content."
        },
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the frozen teacher: 'auto' follows mixed precision (bf16/fp16 when that flag is "
            "set, else the checkpoint's dtype), or one of bfloat16, float16, float32.",
            "choices": list(DTYPE_NAMES),
        },
    )
    ce_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the cross-entropy on response tokens. At the default 0, eval_loss is the "
            "distillation objective, not the CE, so exp(eval_loss) is no perplexity: use eval_ce_loss."
        },
    )
    kd_weight: float = field(default=1.0, metadata={"help": "Weight of the divergence between final logits."})
    kd_divergence: str = field(
        default=PAPER_KD_DIVERGENCE,
        metadata={
            "help": f"Divergence between final logits: {describe_divergences()}.",
            "choices": list(DIVERGENCE_NAMES),
        },
    )
    lens_weight: float = field(
        default=1.0, metadata={"help": "Weight of the logit-lens term (mean over the mapped layer pairs)."}
    )
    lens_divergence: str = field(
        default=PAPER_LENS_DIVERGENCE,
        metadata={
            "help": "Divergence between logit-lens distributions (same choices as kd_divergence).",
            "choices": list(DIVERGENCE_NAMES),
        },
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={
            "help": f"β of {' and '.join(name for name, d in DIVERGENCES.items() if d.uses_beta)}, the "
            "teacher's share of the mixture m (see kd_divergence); 0.5 is the usual symmetric JSD."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Softmax temperature applied to both student and teacher logits in every divergence "
            "(no T² rescaling)."
        },
    )
    feature_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the paper's feature baseline: MSE between a learned linear projection of the teacher's "
            "hidden states and the student's, on the same layer pairs as the lens (0 = off; single process only)."
        },
    )
    lens_student_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Student hidden_states indices for the lens (1..num_layers; 0 is the embedding output). "
            "Default: lens_num_layers evenly spaced layers, as in the paper."
        },
    )
    lens_teacher_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Teacher hidden_states indices, one per student layer. Default: the same relative depth, "
            "floor(s·L_T/L_S)."
        },
    )
    lens_layer_map: str = field(
        default="paper",
        metadata={
            "help": "Teacher layers of the automatic map: paper = the same relative depth; shrunk = the teacher "
            "block each student block was cut from (students written by 'distillens shrink').",
            "choices": list(LAYER_MAPS),
        },
    )
    lens_num_layers: int | None = field(
        default=None,
        metadata={
            "help": "Number of automatically mapped layer pairs (K in the paper). Default: the paper's 5 where "
            "the student allows it, else one per student block but the last (min(5, L_S - 1)); an explicit "
            "value the student is too shallow for is an error."
        },
    )
    lens_final_norm: bool = field(
        default=True,
        metadata={
            "help": "Apply the model's final norm before its LM head in the lens (the reference code did "
            "not: set False to reproduce it)."
        },
    )
    head_chunk_size: str = field(
        default=DEFAULT_CHUNK_SIZE,
        metadata={
            "help": "Response tokens per chunk of the fused, chunked LM head + divergence, for every term that reads "
            "logits (the output KD and CE terms and each lens pair): memory stays flat in the number of tokens and "
            "no [tokens, vocabulary] tensor is built. 'auto' (default): from the vocabulary, 4 fp32 chunk x V "
            "blocks within 256 MiB (320 tokens at V=49k, 128 at V=128k); an integer sets it; 0 = the "
            "straightforward computation on full logits (the reference). Kept as given (a string); the checked "
            "value is DistillLensConfig.head_chunk_tokens."
        },
    )
    head_compile: bool = field(
        default=False,
        metadata={
            "help": "Run the per-chunk softmax and divergence of every term's fused LM head (output and lens) "
            "through torch.compile (needs a C++ compiler on CPU; about 1.6x faster math after a one-off "
            "compilation). Falls back to eager mode, with one warning, when compilation fails."
        },
    )
    lens_eval_profile: bool = field(
        default=False,
        metadata={
            "help": "At each evaluation, also log every student layer's lens divergence from the teacher layer at "
            "the same relative depth (eval_lens_profile/s{i}) and each layer's lens entropy (eval_lens_entropy/...); "
            "costs one more forward pass of both models over the evaluation set."
        },
    )

    nonfinite_policy: str = field(
        default="stop",
        metadata={
            "help": "What a non-finite (NaN or inf) training loss, loss term or gradient does: stop (default) "
            "ends training at once with one line naming the step, the terms and where the values came from "
            "(the teacher's outputs, the cache's signals, the student), before that step's update, so the last "
            "checkpoint is kept and no final model is saved; skip drops that step's update instead, logs it as "
            "skipped_steps and trains on (it still stops once the student's own weights are non-finite).",
            "choices": list(NONFINITE_POLICIES),
        },
    )

    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "On-policy share: the probability that an optimizer window trains on completions the student "
            "samples for the window's prompts (GKD's lmbda; 0 = off-policy, the paper's setting; 1 = always "
            "on-policy). The lens and output terms are then means over the generated tokens."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Off-policy windows train on completions the teacher samples instead of the dataset's "
            "responses (sequence-level KD, GKD's seq_kd). Needs a teacher."
        },
    )
    max_new_tokens: int = field(
        default=128,
        metadata={"help": "Most tokens sampled per completion on on-policy (and seq_kd) windows."},
    )
    generation_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature of those completions (the loss's softmax temperature is `temperature`)."
        },
    )
    generation_top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling mass of those completions, in (0, 1]; 1 = off."}
    )
    generation_top_k: int = field(
        default=0, metadata={"help": "Top-k sampling of those completions; 0 = off (untruncated sampling)."}
    )

    lens_chunk_size: str | None = field(
        default=None,
        metadata={
            "help": "Deprecated: use --head_chunk_size (it governs every term's fused LM head, not only the lens)."
        },
    )
    lens_compile: bool | None = field(
        default=None,
        metadata={
            "help": "Deprecated: use --head_compile (it governs every term's fused LM head, not only the lens)."
        },
    )

    def __post_init__(self) -> None:
        self._adopt_deprecated_fields()
        self._check_optimisation()
        check_deepspeed_config(self.deepspeed)
        super().__post_init__()
        # pinning only speeds up copies to an accelerator; torch warns without one
        if self.device.type == "cpu":
            self.dataloader_pin_memory = False
        check_fsdp_config(self)
        _ = self.objective_spec  # building the spec validates the weights, divergences, temperature and β
        check_dtype_name("teacher_dtype", self.teacher_dtype)
        self.teacher_model_name_or_path, self.teacher_gguf_file = split_gguf_path(
            self.teacher_model_name_or_path,
            self.teacher_gguf_file,
            "teacher_model_name_or_path",
            "teacher_gguf_file",
        )
        check_layer_map_choice(self.lens_layer_map, self.lens_teacher_layers)
        self.head_chunk_size = str(check_chunk_size(self.head_chunk_size))
        self._check_generation()
        self._check_teacher_cache()
        uses_layers = self.lens_weight > 0 or self.feature_weight > 0
        if (
            self.lens_num_layers is not None
            and self.lens_num_layers < 1
            and uses_layers
            and self.lens_student_layers is None
        ):
            raise ValueError(f"lens_num_layers={self.lens_num_layers} must be >= 1 while lens_weight > 0.")
        self._check_layer_lists()

    def _adopt_deprecated_fields(self) -> None:
        """A deprecated field (:data:`DEPRECATED_FIELDS`) that was given: a FutureWarning naming its new field,
        and its value copied there; ValueError when both were given with different values."""
        for old, new in DEPRECATED_FIELDS.items():
            value = getattr(self, old)
            if value is None:
                continue
            warnings.warn(
                f"DistillLensConfig.{old} is deprecated and will be removed in the next minor release: use {new} "
                f"(--{new}), which governs every term's fused LM head, not only the lens.",
                FutureWarning,
                stacklevel=4,  # the caller of DistillLensConfig(...): __init__ -> __post_init__ -> here
            )
            current, default = getattr(self, new), self.__dataclass_fields__[new].default
            if not (_same_setting(current, default) or _same_setting(current, value)):
                raise ValueError(
                    f"{old}={value!r} and {new}={current!r} disagree: {old} is the deprecated name of {new}; "
                    f"give only {new}."
                )
            setattr(self, new, value)
            # one place for the value: copies and run records carry only the new name
            setattr(self, old, None)

    @property
    def head_chunk_tokens(self) -> int | Literal["auto"]:
        """The checked ``head_chunk_size``: tokens per chunk of every term's fused LM head, ``"auto"`` (sized from
        the vocabulary when the objective is built), or 0 (the straightforward computation on full logits).
        The field itself stays the string the command line parses."""
        return check_chunk_size(self.head_chunk_size)  # type: ignore[return-value]

    def _check_optimisation(self) -> None:
        """The settings that would make every update non-finite or empty, and ``nonfinite_policy``."""
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(
                f"learning_rate={self.learning_rate} must be a finite number > 0 (typically 1e-5 to 1e-3)."
            )
        if not math.isfinite(self.weight_decay):
            raise ValueError(f"weight_decay={self.weight_decay} must be a finite number (0 = off).")
        if math.isnan(self.max_grad_norm):
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be a number >= 0 (0 = no clipping).")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} must be >= 1 (1 = an update after "
                "every batch)."
            )
        if self.nonfinite_policy not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite_policy={self.nonfinite_policy!r} must be one of {', '.join(NONFINITE_POLICIES)}."
            )
        if self.nonfinite_policy == "skip" and self.deepspeed:
            raise ValueError(
                "nonfinite_policy='skip' cannot drop an update under DeepSpeed, whose engine steps inside the "
                "backward: use nonfinite_policy='stop' (DeepSpeed's fp16 loss scaler skips overflowing steps itself)."
            )

    def _check_generation(self) -> None:
        """The on-policy settings: ``lmbda``, ``seq_kd`` and the sampling of completions."""
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda={self.lmbda} must lie in [0, 1] (0 = off-policy, 1 = always on-policy).")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1.")
        if not self.generation_temperature > 0:
            raise ValueError(f"generation_temperature={self.generation_temperature} must be > 0.")
        if not 0.0 < self.generation_top_p <= 1.0:
            raise ValueError(f"generation_top_p={self.generation_top_p} must lie in (0, 1] (1 = off).")
        if self.generation_top_k < 0:
            raise ValueError(f"generation_top_k={self.generation_top_k} must be >= 0 (0 = off).")
        if self.seq_kd and not self.objective_spec.needs_teacher:
            raise ValueError(
                "seq_kd=True samples completions from the teacher, but kd_weight, lens_weight and feature_weight "
                "are 0 (no teacher): set seq_kd=False, or give the objective a teacher term."
            )

    def _check_teacher_cache(self) -> None:
        """What a teacher cache cannot serve: tokens it has not seen, raw hidden states, a second teacher pass."""
        if not self.teacher_cache:
            return
        refused = [
            (
                self.lmbda > 0,
                f"lmbda={self.lmbda} (on-policy windows train on sampled tokens, which no cache holds)",
            ),
            (self.seq_kd, "seq_kd=True (the teacher samples the completions)"),
            (
                self.feature_weight > 0,
                "feature_weight > 0 (the feature baseline reads the raw hidden states)",
            ),
            (self.lens_eval_profile, "lens_eval_profile=True (the profile runs the teacher's every layer)"),
        ]
        for refused_here, what in refused:
            if refused_here:
                raise ValueError(
                    f"teacher_cache cannot serve {what}: drop teacher_cache to run the teacher online."
                )
        if not self.objective_spec.needs_teacher:
            raise ValueError(
                "teacher_cache is set but kd_weight and lens_weight are 0 (plain SFT): drop teacher_cache."
            )

    @property
    def generates_completions(self) -> bool:
        """Whether some windows train on sampled completions (``lmbda > 0`` or ``seq_kd``)."""
        return self.lmbda > 0 or self.seq_kd

    def _check_layer_lists(self) -> None:
        student, teacher = self.lens_student_layers, self.lens_teacher_layers
        if teacher is not None and student is None:
            raise ValueError(
                "lens_teacher_layers was given without lens_student_layers: give both, or neither."
            )
        if student is not None and teacher is not None and len(student) != len(teacher):
            raise ValueError(
                f"lens_student_layers has {len(student)} entries but lens_teacher_layers has {len(teacher)}: "
                "give one teacher layer per student layer."
            )
        for name, layers in (("lens_student_layers", student), ("lens_teacher_layers", teacher)):
            if layers is not None and any(index < 1 for index in layers):
                raise ValueError(
                    f"{name}={layers} holds an index < 1; hidden_states index 0 is the embedding output."
                )
        check_distinct_layer_lists(student, teacher)

    @property
    def objective_spec(self) -> ObjectiveSpec:
        """The loss settings as an immutable :class:`ObjectiveSpec` (each of its fields is a field of this config)."""
        return ObjectiveSpec(
            **{item.name: getattr(self, item.name) for item in dataclasses.fields(ObjectiveSpec)}
        )

    @classmethod
    def from_training_arguments(
        cls, args: TrainingArguments, **distillation_fields: Any
    ) -> DistillLensConfig:
        """A DistillLensConfig with every ``TrainingArguments`` field of ``args`` (a TRL ``SFTConfig`` or any other
        subclass; fields only the subclass has, such as ``SFTConfig.max_length``, are dropped) plus
        ``distillation_fields`` (``kd_weight=...``, ``teacher_model_name_or_path=...``)."""
        if not isinstance(args, TrainingArguments):
            raise ValueError(
                f"args is a {type(args).__name__}, not a TrainingArguments: build DistillLensConfig(...)."
            )
        values = {
            item.name: getattr(args, item.name) for item in dataclasses.fields(TrainingArguments) if item.init
        }
        if isinstance(args, cls):  # the deprecated names' values already live in their new fields
            own = (
                {item.name for item in dataclasses.fields(cls) if item.init}
                - set(values)
                - set(DEPRECATED_FIELDS)
            )
            values |= {name: getattr(args, name) for name in own}
        return cls(**(values | distillation_fields))


def _same_setting(a: Any, b: Any) -> bool:
    """Whether two values of one setting agree, a chunk size given as ``256`` or ``"256"`` alike."""
    return str(a).strip() == str(b).strip()


def check_deepspeed_config(value: Any) -> None:
    """ValueError (one line naming the file and the place) for a ``deepspeed`` file that is missing or not JSON,
    before ``TrainingArguments`` reads it (its JSON error names neither the flag nor the file)."""
    if not isinstance(value, str) or not value.strip() or value.lstrip().startswith("{"):
        return
    path = Path(value).expanduser()
    if not path.is_file():
        if path.suffix.lower() == ".json" or path.exists():
            raise ValueError(
                f"deepspeed={value!r}: no such file: give a DeepSpeed JSON config (see examples/deepspeed/), "
                "or --deepspeed '' for none."
            )
        return  # a base64-encoded config, which TrainingArguments decodes
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"deepspeed={value!r} is not JSON ({error.msg} at line {error.lineno} column {error.colno}): give a "
            "DeepSpeed JSON config (see examples/deepspeed/)."
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(
            f"deepspeed={value!r} cannot be read ({error}): give a readable JSON file."
        ) from None
