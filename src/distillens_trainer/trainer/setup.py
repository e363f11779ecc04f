"""The trainer's setup after ``Trainer.__init__``: the teacher (a model, a cache, or none), the lenses, the layer map,
the shared vocabulary, the feature baseline's projector and the objective built once from them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..config import DistillLensConfig
from ..loss.feature_baseline import FeatureProjector
from ..loss.heads import LinearHead
from ..loss.layer_map import LayerMapFields, LayerPair, adapted_num_pairs_note, resolve_run_layer_map
from ..loss.lens import LogitLens
from ..loss.objective import DistillLensObjective
from ..loss.teacher_signals import ModelTeacher, TeacherSource
from ..models.facts import hidden_size, model_vocab_size, unwrap_model
from ..models.loading import drop_gguf_quantization
from ..models.shrink import recorded_kept_layers
from ..teacher.frozen import shared_vocab_size
from ..teacher.placement import prepare_teacher
from .inputs import tokenizer_of
from .nonfinite import describe_tensors, nonfinite_tensors, refuse_nonfinite_weights

logger = logging.getLogger(__name__)


class OpenedCache(Protocol):
    """What the setup reads of an opened teacher cache (``teacher.cached.CachedTeacher``, also the run's
    :class:`~distillens_trainer.loss.teacher_signals.TeacherSource`)."""

    layer_map: list[LayerPair]
    vocab_size: int
    head: LinearHead | None


@dataclass
class DistillationSetup:
    """What the trainer keeps of its setup.

    Attributes:
        teacher_model: the placed, frozen teacher model, or None (a cache, or no teacher).
        cached_teacher: the opened teacher cache, or None.
        teacher: the run's teacher as the objective reads it (the model's or the cache's source), or None.
        student_lens / teacher_lens: the logit lenses the terms (and ``lens_eval_profile``) read, or None.
        layer_map: the (student, teacher) ``hidden_states`` pairs of the lens term.
        vocab_size: the shared vocabulary (None without a teacher: the student's own).
        feature_projector: the feature baseline's learned maps (``feature_weight > 0``), or None.
        objective: the objective, built once.
    """

    teacher_model: nn.Module | None
    cached_teacher: OpenedCache | None
    teacher: TeacherSource | None
    student_lens: LogitLens | None
    teacher_lens: LogitLens | None
    layer_map: list[LayerPair]
    vocab_size: int | None
    feature_projector: FeatureProjector | None
    objective: DistillLensObjective


def refuse_nonfinite_cached_head(head: LinearHead | None, cache_path: str) -> None:
    """ValueError (one line) when the teacher cache's LM head holds NaN or inf."""
    if head is None:
        return
    found = nonfinite_tensors(
        [
            (name, tensor)
            for name, tensor in (("weight", head.weight), ("bias", head.bias))
            if tensor is not None
        ]
    )
    if found:
        raise ValueError(
            f"the teacher cache {cache_path} holds a non-finite LM head (teacher_head.safetensors: "
            f"{describe_tensors(found)}): rebuild it with distillens cache-teacher --overwrite_output_dir true."
        )


def feature_projector_for(
    layer_map: list[LayerPair],
    teacher: nn.Module,
    student: nn.Module,
    device: torch.device,
    *,
    distributed: bool,
) -> FeatureProjector:
    """The feature baseline's projections (single process only: they are not synchronised across devices)."""
    if distributed:
        raise ValueError(
            "feature_weight > 0 (the MSE feature baseline) runs in a single process only: its projections are "
            "not synchronised across devices; set feature_weight=0 for distributed runs."
        )
    return FeatureProjector(layer_map, hidden_size(teacher), hidden_size(student)).to(device)


def set_up_distillation(
    args: DistillLensConfig,
    student: nn.Module,
    teacher_model: nn.Module | None,
    cached_teacher: OpenedCache | None,
    *,
    processing_class: Any | None,
    teacher_processing_class: Any | None,
    accelerator: Any,
    distributed: bool,
    teacher_name: str | None,
) -> DistillationSetup:
    """Place the teacher (or check its opened cache) and build what the objective reads, then the objective.

    Args:
        args: the run's config.
        student: the student as the ``Trainer`` holds it (``trainer.model``).
        teacher_model: the resolved teacher model (not yet placed), or None.
        cached_teacher: the opened teacher cache (``teacher.cached.open_cached_teacher``), or None.
        processing_class / teacher_processing_class: the tokenizers, to compare vocabularies.
        accelerator: the ``Trainer``'s, where the teacher is placed.
        distributed: the run spans processes or shards (DeepSpeed, FSDP): the feature baseline is refused.
        teacher_name: how messages name the teacher.
    """
    spec = args.objective_spec
    if teacher_model is not None:
        drop_gguf_quantization(unwrap_model(teacher_model))
        teacher_model = prepare_teacher(teacher_model, args, accelerator)
    refuse_nonfinite_weights(
        teacher_model,
        "the teacher",
        f"check or re-save the teacher ({teacher_name or 'teacher_model'}), or load it in another "
        "teacher_dtype (a bfloat16 checkpoint can overflow in float16)",
    )
    student_lens: LogitLens | None = None
    teacher_lens: LogitLens | None = None
    layer_map: list[LayerPair] = []
    vocab_size: int | None = None
    feature_projector: FeatureProjector | None = None
    if cached_teacher is not None:
        vocab_size, layer_map = cached_teacher.vocab_size, cached_teacher.layer_map
        refuse_nonfinite_cached_head(cached_teacher.head, args.teacher_cache)
        if spec.uses_lens:
            student_lens = LogitLens(student, final_norm=args.lens_final_norm)
    if teacher_model is not None:
        vocab_size = shared_vocab_size(
            student, teacher_model, tokenizer_of(processing_class), tokenizer_of(teacher_processing_class)
        )
        if spec.uses_hidden_states:
            student_lens = LogitLens(student, final_norm=args.lens_final_norm)
            teacher_lens = LogitLens(teacher_model, final_norm=args.lens_final_norm)
            layer_map = resolve_run_layer_map(
                student_lens.num_layers,
                teacher_lens.num_layers,
                LayerMapFields.of(args),
                recorded_kept_layers(unwrap_model(student).config),
            )
            logger.info("DistillLens layer map (student, teacher): %s", layer_map)
            note = adapted_num_pairs_note(student_lens.num_layers, args.lens_num_layers)
            if note is not None and args.lens_student_layers is None:
                logger.info(note)
        if spec.feature_weight > 0:
            feature_projector = feature_projector_for(
                layer_map, teacher_model, student, args.device, distributed=distributed
            )
    teacher: TeacherSource | None = cached_teacher  # type: ignore[assignment]: a CachedTeacher is a source
    if teacher_model is not None:
        teacher = ModelTeacher(teacher_model, teacher_lens)
    objective = DistillLensObjective(
        spec,
        vocab_size=vocab_size or model_vocab_size(student),
        student=student,
        teacher=teacher,
        student_lens=student_lens,
        layer_map=layer_map,
        feature_projector=feature_projector,
        chunk_size=args.head_chunk_tokens,
        compile_math=args.head_compile,
    )
    return DistillationSetup(
        teacher_model,
        cached_teacher,
        teacher,
        student_lens,
        teacher_lens,
        layer_map,
        vocab_size,
        feature_projector,
        objective,
    )
