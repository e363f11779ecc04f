"""The trainer's side of a teacher cache: open it and check, before any step, that it serves this run."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import DistillLensConfig
from ..loss.forwards import ForwardRequest
from ..loss.heads import LinearHead
from ..loss.layer_map import LayerMapFields, LayerPair, adapted_num_pairs_note, resolve_run_layer_map
from ..loss.teacher_signals import TeacherSignals, TeacherSource
from ..models.facts import DTYPES, model_vocab_size, num_hidden_layers, unwrap_model
from ..models.shrink import recorded_kept_layers
from .cache.format import CacheSettings, tokenizer_fingerprint, weights_fingerprint
from .cache.reader import REBUILD, TeacherCache
from .frozen import load_teacher, shared_vocab_size_of_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedTeacher(TeacherSource):
    """An opened cache and what the objective takes from it: a run's teacher read from a cache (a
    :class:`~distillens_trainer.loss.teacher_signals.TeacherSource`), no teacher model built.

    Attributes:
        cache: the opened cache.
        layer_map: the run's layer map, served by the cache.
        vocab_size: the shared vocabulary the cache compares.
        head: the cached LM head (``hidden`` mode), else None.
        device: where each batch's signals are put.
    """

    cache: TeacherCache
    layer_map: list[LayerPair]
    vocab_size: int
    head: LinearHead | None  # hidden mode: the cached LM head
    device: torch.device | str = "cpu"

    @property
    def mode(self) -> str:
        return self.cache.settings.mode

    def fused_refusal(self) -> str | None:
        return None  # the cached head is a LinearHead; top-k buckets need none

    def signals(self, inputs: Mapping[str, torch.Tensor], request: ForwardRequest) -> TeacherSignals:
        return self.cache.signals(inputs, self.device, head=self.head)


LENS_LAYER_FLAGS = ("lens_layer_map", "lens_num_layers", "lens_student_layers", "lens_teacher_layers")


def check_layer_map_served(layer_map: Sequence[LayerPair], settings: CacheSettings, where: str) -> None:
    """ValueError (one line, naming this run's map and the cache's, and the fix) when ``layer_map`` reads a
    teacher layer the cache does not hold."""
    missing = sorted({teacher for _, teacher in layer_map} - set(settings.layers))
    if missing:
        flags = "/".join(f"--{flag}" for flag in LENS_LAYER_FLAGS)
        raise ValueError(
            f"the layer map {[tuple(pair) for pair in layer_map]} reads teacher layers {missing}, which the teacher "
            f"cache {where} lacks (it was made for the layer map {[tuple(pair) for pair in settings.layer_map]} and "
            f"holds teacher layers {list(settings.layers)}): drop {flags} to train on the cache's map, or "
            f"{REBUILD} with the same lens flags as this run."
        )


def check_cache_serves(
    settings: CacheSettings, args: DistillLensConfig, student: nn.Module, tokenizer: Any | None, where: str
) -> tuple[list[LayerPair], int]:
    """The layer map and shared vocabulary of this run, from the cache's teacher; ValueError (one line) when the
    cache was made for another tokenizer, vocabulary, layer map, lens norm or temperature."""
    recorded = settings.tokenizer_sha256
    if tokenizer is not None and recorded is not None and tokenizer_fingerprint(tokenizer) != recorded:
        raise ValueError(
            f"the teacher cache {where} was made with another tokenizer than the student's: {REBUILD} for this student."
        )
    vocab_size = shared_vocab_size_of_rows(
        model_vocab_size(student), settings.teacher.vocab_rows, tokenizer, None
    )
    if vocab_size != settings.vocab_size:
        raise ValueError(
            f"the teacher cache {where} compares {settings.vocab_size} vocabulary columns, this student shares "
            f"{vocab_size} with its teacher: {REBUILD} with this student."
        )
    spec = args.objective_spec
    layer_map: list[LayerPair] = []
    if spec.uses_lens:
        layer_map = resolve_run_layer_map(
            num_hidden_layers(student),
            settings.teacher.num_layers,
            LayerMapFields.of(args),
            recorded_kept_layers(unwrap_model(student).config),
        )
        check_layer_map_served(layer_map, settings, where)
        if args.lens_final_norm != settings.lens_final_norm and any(
            t != settings.output_layer for _, t in layer_map
        ):
            raise ValueError(
                f"lens_final_norm={args.lens_final_norm}, but the teacher cache {where} was made with "
                f"lens_final_norm={settings.lens_final_norm}: set it to match, or {REBUILD}."
            )
    if settings.mode == "topk" and args.temperature != settings.temperature:
        raise ValueError(
            f"temperature={args.temperature}, but the top-k teacher cache {where} holds log-probabilities at "
            f"temperature {settings.temperature}: set temperature={settings.temperature}, or {REBUILD}."
        )
    return layer_map, vocab_size


def check_named_teacher(
    name_or_path: str, gguf_file: str | None, settings: CacheSettings, where: str
) -> None:
    """A teacher named beside a cache is checked to be the cache's: loaded once (on the CPU, in the dtype the
    cache recorded), fingerprinted and freed; ValueError (one line) when its weights fingerprint differs."""
    recorded = settings.teacher
    start = time.perf_counter()
    teacher = load_teacher(name_or_path, DTYPES.get(recorded.dtype), gguf_file=gguf_file)
    try:
        fingerprint = weights_fingerprint(teacher)
    finally:
        del teacher
    if fingerprint != recorded.weights_fingerprint:
        raise ValueError(
            f"teacher_model_name_or_path={name_or_path!r} is not the teacher the teacher cache {where} was made "
            f"from ({recorded.name_or_path!r}; their weights fingerprints differ): drop teacher_model_name_or_path "
            "to train from the cache, or rebuild the cache with distillens cache-teacher from this teacher."
        )
    logger.info(
        "teacher_model_name_or_path=%s matches the teacher cache's weights fingerprint (checked in %.1f s); the "
        "cache is read, the teacher is not kept.",
        name_or_path,
        time.perf_counter() - start,
    )


def open_cached_teacher(
    args: DistillLensConfig,
    student: nn.Module,
    tokenizer: Any | None,
    datasets: Mapping[str, Any],
    device: torch.device,
) -> CachedTeacher:
    """Open ``args.teacher_cache``, check that it serves this run and holds every row of ``datasets`` (name ->
    tokenised dataset, a dict of them, or None)."""
    cache = TeacherCache.open(args.teacher_cache)
    settings = cache.settings
    layer_map, vocab_size = check_cache_serves(settings, args, student, tokenizer, args.teacher_cache)
    for name, dataset in datasets.items():
        parts = dataset.items() if isinstance(dataset, Mapping) else [(name, dataset)]
        for part_name, part in parts:
            cache.check_rows(part, part_name if part_name == name else f"{name} {part_name}")
    if args.teacher_model_name_or_path:
        check_named_teacher(
            args.teacher_model_name_or_path, args.teacher_gguf_file, settings, args.teacher_cache
        )
    head = cache.teacher_head(device) if settings.mode == "hidden" else None
    note = adapted_num_pairs_note(num_hidden_layers(student), args.lens_num_layers)
    if layer_map and note is not None and args.lens_student_layers is None:
        logger.info(note)
    logger.info(
        "DistillLens: teacher read from the %s cache %s (%d rows, teacher layers %s); no teacher model is built.",
        settings.mode,
        args.teacher_cache,
        len(cache),
        list(settings.layers),
    )
    return CachedTeacher(cache, layer_map, vocab_size, head, device)
