"""What ``distillens train --teacher_cache`` takes from the cache before anything loads: its prompt format (the
rows must tokenise as the cache's did) and, unless a lens layer flag chooses another, the layer map it was made for."""

from __future__ import annotations

from ...config import DistillLensConfig
from ...data.arguments import DataArguments
from ...loss.layer_map import LayerMapFields, LayerPair, resolve_run_layer_map
from ...models.facts import config_num_layers
from ...models.loading import ModelArguments, read_config
from ...models.shrink import recorded_kept_layers
from ..cached import LENS_LAYER_FLAGS, check_layer_map_served
from .format import CacheSettings
from .reader import checked_manifest


def adopt_cache_prompt_format(data_args: DataArguments, teacher_cache: str, given: set[str]) -> None:
    """With ``--teacher_cache``: tokenise as the cache was made (its prompt template, columns and length limits
    fill the fields not given); ValueError (one line) when a given field differs, since no row would match, or when
    the cache is not whole (every file is checked against its sha256 here, before any weights are loaded)."""
    manifest = checked_manifest(teacher_cache)
    for name, value in manifest["settings"]["prompt_format"].items():
        if name not in given:
            setattr(data_args, name, value)
        elif getattr(data_args, name) != value:
            raise ValueError(
                f"--{name} {getattr(data_args, name)} differs from the teacher cache {teacher_cache}, tokenised with "
                f"{name}={value}: drop --{name} (the cache's is used), or rebuild the cache with distillens "
                "cache-teacher."
            )
    data_args.__post_init__()


def adopt_cache_layer_map(
    model_args: ModelArguments, training_args: DistillLensConfig, teacher_cache: str, given: set[str]
) -> list[LayerPair] | None:
    """With ``--teacher_cache`` and the lens on: train on the layer map the cache was made for (it becomes the
    run's ``lens_student_layers``/``lens_teacher_layers``), unless a lens layer flag was given; returns the adopted
    map, else None. A given flag whose map reads a teacher layer the cache lacks is one line naming both maps and
    the fix, from the student's config, before any weights load. A student of another depth than the one the cache
    was resolved against keeps the automatic map (the trainer then checks that the cache serves it)."""
    if not training_args.objective_spec.uses_lens:
        return None
    settings = CacheSettings.from_json(checked_manifest(teacher_cache)["settings"])
    student = read_config(
        model_args.model_name_or_path, model_args.gguf_file, trust_remote_code=model_args.trust_remote_code
    )
    student_num_layers = config_num_layers(student) if student is not None else None
    if any(flag in given for flag in LENS_LAYER_FLAGS):
        if student_num_layers is not None:
            layer_map = resolve_run_layer_map(
                student_num_layers,
                settings.teacher.num_layers,
                LayerMapFields.of(training_args),
                recorded_kept_layers(student),
            )
            check_layer_map_served(layer_map, settings, teacher_cache)
        return None
    if not settings.layer_map or student_num_layers != settings.student.get("num_layers"):
        return None
    training_args.lens_student_layers = [student_layer for student_layer, _ in settings.layer_map]
    training_args.lens_teacher_layers = [teacher_layer for _, teacher_layer in settings.layer_map]
    return [tuple(pair) for pair in settings.layer_map]
