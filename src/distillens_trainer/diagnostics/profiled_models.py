"""The models ``distillens lens`` profiles: their context checked from their configs, loaded and frozen, and the
training's layer map marked in the report (from the flags, else the student's run record)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..data.arguments import PromptFormatArguments
from ..loss.layer_map import LayerMapFields, LayerPair, resolve_run_layer_map
from ..models.facts import check_fits_contexts, freeze, num_hidden_layers
from ..models.info import RESOLVED_CONFIG_NAME, recorded_training_settings
from ..models.loading import ModelArguments, load_student, read_config
from ..models.shrink import recorded_kept_layers
from ..teacher.frozen import (
    load_frozen_teacher,
    load_teacher_tokenizer,
    read_teacher_config,
    resolve_teacher_dtype,
    shared_vocab_size,
)
from .arguments import LensArguments

logger = logging.getLogger(__name__)

LAYER_MAP_FIELDS = ("lens_layer_map", "lens_num_layers", "lens_student_layers", "lens_teacher_layers")


def recorded_layer_map_settings(model_name_or_path: str | None) -> dict[str, Any] | None:
    """The layer-map fields (:data:`LAYER_MAP_FIELDS`) ``distillens train`` recorded in the student's folder
    (``distillens_config.json``; for a ``checkpoint-*`` folder, its run's), when that training used the layer map
    (``lens_weight`` or ``feature_weight`` > 0); None otherwise (no record, unreadable, or no lens)."""
    training = recorded_training_settings(model_name_or_path)
    if training is None:
        return None
    if not (training.get("lens_weight") or 0) > 0 and not (training.get("feature_weight") or 0) > 0:
        return None
    return {name: training.get(name) for name in LAYER_MAP_FIELDS}


def layer_map_settings(args: LensArguments, model_name_or_path: str | None) -> dict[str, Any]:
    """The layer-map fields to resolve: the flags when any is given, else the student's training record, else
    the training defaults (``paper``, the default number of pairs)."""
    given = {name: getattr(args, name) for name in LAYER_MAP_FIELDS}
    if any(value is not None for value in given.values()):
        return given
    recorded = recorded_layer_map_settings(model_name_or_path)
    if recorded is not None:
        logger.info(
            "layer map as recorded with the student (%s): %s",
            RESOLVED_CONFIG_NAME,
            ", ".join(f"{name}={value}" for name, value in recorded.items() if value is not None),
        )
        return recorded
    return given


def mapped_layer_pairs(
    args: LensArguments, student: torch.nn.Module, teacher_num_layers: int, model_name_or_path: str | None
) -> list[LayerPair]:
    """The training's layer map (:func:`~distillens_trainer.loss.layer_map.resolve_run_layer_map`, as
    ``distillens train`` resolves it) from :func:`layer_map_settings`; none for a one-block student without
    explicit layers (it has no intermediate layer)."""
    return resolve_run_layer_map(
        num_hidden_layers(student),
        teacher_num_layers,
        LayerMapFields.of(layer_map_settings(args, model_name_or_path)),
        recorded_kept_layers(student.config),
        required=False,
    )


def load_profiled_models(
    model_args: ModelArguments, args: LensArguments, tokenizer: Any
) -> tuple[torch.nn.Module, torch.nn.Module | None, int]:
    """Student, teacher (or None; in the student's ``dtype``) on the device, frozen, and their shared vocabulary."""
    device = args.resolved_device()
    student = freeze(load_student(model_args)).to(device)
    if args.teacher_model_name_or_path is None:
        return student, None, shared_vocab_size(student, student, tokenizer, tokenizer)
    teacher = load_frozen_teacher(
        args.teacher_model_name_or_path,
        resolve_teacher_dtype(model_args.dtype),
        gguf_file=args.teacher_gguf_file,
        device=device,
        trust_remote_code=model_args.trust_remote_code,
    )
    teacher_tokenizer = load_teacher_tokenizer(args.teacher_model_name_or_path, args.teacher_gguf_file)
    return student, teacher, shared_vocab_size(student, teacher, tokenizer, teacher_tokenizer)


def check_lengths_before_loading(
    model_args: ModelArguments, prompt_format: PromptFormatArguments, args: LensArguments
) -> None:
    """``--max_length`` must fit the student's and the teacher's context, read from their configs (no weights)."""
    configs = {
        "student": read_config(
            model_args.model_name_or_path,
            model_args.gguf_file,
            trust_remote_code=model_args.trust_remote_code,
        ),
        "teacher": read_teacher_config(
            args.teacher_model_name_or_path,
            args.teacher_gguf_file,
            trust_remote_code=model_args.trust_remote_code,
        ),
    }
    check_fits_contexts(
        prompt_format.max_length,
        configs,
        setting="--max_length",
        fix="pass --max_length {limit} or less (and --max_prompt_length below it)",
    )
