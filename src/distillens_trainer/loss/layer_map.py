"""Which student layer imitates which teacher layer through the logit lens.

Indices follow the Hugging Face ``hidden_states`` convention: 0 is the embedding output, ``i`` the
residual stream after block ``i``, and ``num_layers`` the last block's output (already normed by HF).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LayerPair = tuple[int, int]

LAYER_MAPS: tuple[str, ...] = ("paper", "shrunk")


def check_layer_map_choice(layer_map: str, teacher_layers: Sequence[int] | None) -> None:
    """ValueError (one line) for an unknown ``lens_layer_map``, or ``shrunk`` with explicit teacher layers."""
    if layer_map not in LAYER_MAPS:
        raise ValueError(f"lens_layer_map={layer_map!r} must be one of {', '.join(LAYER_MAPS)}.")
    if layer_map == "shrunk" and teacher_layers is not None:
        raise ValueError(
            "lens_layer_map='shrunk' derives the teacher layers: drop lens_teacher_layers, or use "
            "lens_layer_map='paper' with explicit layers."
        )


PAPER_NUM_PAIRS = 5  # K in the paper: the automatic map's number of pairs where the student is deep enough
KEPT_LAYERS_CONFIG_KEY = (
    "distillens_kept_layers"  # written by ``distillens shrink``: teacher block indices (0-based)
)


def kept_layers_for_map(lens_layer_map: str, recorded_kept_layers: Sequence[int] | None) -> list[int] | None:
    """The kept teacher blocks ``lens_layer_map`` pairs with: the student's record for ``'shrunk'``, None for the
    paper's map. ValueError when ``'shrunk'`` meets a student that recorded none (not written by ``shrink``)."""
    if lens_layer_map != "shrunk":
        return None
    if recorded_kept_layers is None:
        raise ValueError(
            f"lens_layer_map='shrunk' needs a student written by 'distillens shrink' (its config records "
            f"{KEPT_LAYERS_CONFIG_KEY}); this one has none: use lens_layer_map='paper'."
        )
    return list(recorded_kept_layers)


def shrunk_kept_layers(student_config: Any, lens_layer_map: str) -> list[int] | None:
    """Deprecated: pass the student's record (``models.shrink.recorded_kept_layers(config)``) to
    :func:`resolve_run_layer_map`, or use :func:`kept_layers_for_map`. The teacher blocks a shrunk student was cut
    from, for ``lens_layer_map='shrunk'``; None for the paper's map."""
    warnings.warn(
        "shrunk_kept_layers is deprecated: pass the student's kept layers (models.shrink.recorded_kept_layers) "
        "to resolve_run_layer_map, or use kept_layers_for_map.",
        DeprecationWarning,
        stacklevel=2,
    )
    return kept_layers_for_map(lens_layer_map, getattr(student_config, KEPT_LAYERS_CONFIG_KEY, None))


def paper_student_layers(student_num_layers: int, num_pairs: int) -> list[int]:
    """The paper's evenly spaced student layers: s_k = round(k·L_S/(K+1)), halves rounding up, k = 1..K."""
    return [
        (2 * k * student_num_layers + num_pairs + 1) // (2 * (num_pairs + 1)) for k in range(1, num_pairs + 1)
    ]


def proportional_teacher_layer(student_layer: int, student_num_layers: int, teacher_num_layers: int) -> int:
    """The teacher layer at the same relative depth: floor(s·L_T/L_S)."""
    return student_layer * teacher_num_layers // student_num_layers


def kept_teacher_layers(
    student_layers: Sequence[int], kept_layers: Sequence[int], student_num_layers: int
) -> list[int]:
    """Teacher ``hidden_states`` indices of the blocks the student's blocks were cut from: s -> kept[s-1] + 1."""
    kept_layers = list(kept_layers)
    if len(kept_layers) != student_num_layers:
        raise ValueError(
            f"{KEPT_LAYERS_CONFIG_KEY} lists {len(kept_layers)} blocks but the student has {student_num_layers}: "
            "use lens_layer_map='paper' for a student that was not cut with 'distillens shrink' as it is now."
        )
    return [kept_layers[student_layer - 1] + 1 for student_layer in student_layers]


def _check_indices(layers: Sequence[int], num_layers: int, field: str, model: str) -> None:
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= num_layers:
            raise ValueError(
                f"{field} holds {index!r}, but the {model} has {num_layers} layers: use indices in 1..{num_layers} "
                "(hidden_states convention: 0 is the embedding output and is not a lens layer)."
            )


def default_num_pairs(student_num_layers: int) -> int:
    """The automatic map's number of pairs when ``lens_num_layers`` is not given: the paper's 5 where the student
    allows it, else one per block but the last (``min(5, L_S - 1)``), which keeps the paper's evenly spaced
    layers distinct and below the student's output (``s_k = k`` for ``k = 1..L_S-1``). 0 for a one-block student,
    which has no intermediate layer."""
    return max(0, min(PAPER_NUM_PAIRS, student_num_layers - 1))


def adapted_num_pairs_note(student_num_layers: int, num_layers: int | None) -> str | None:
    """The log line that says the automatic map was shortened for a shallow student; None when
    ``lens_num_layers`` was given or the paper's 5 pairs fit."""
    if num_layers is not None or default_num_pairs(student_num_layers) == PAPER_NUM_PAIRS:
        return None
    pairs = default_num_pairs(student_num_layers)
    return (
        f"lens_num_layers not given: the student has {student_num_layers} layers, so the lens maps {pairs} "
        f"pair{'s' * (pairs != 1)} (the paper's {PAPER_NUM_PAIRS} need at least {PAPER_NUM_PAIRS + 1} layers); "
        "pass lens_num_layers or lens_student_layers to choose."
    )


def resolve_student_layers(
    student_num_layers: int, student_layers: Sequence[int] | None = None, num_layers: int | None = None
) -> list[int]:
    """The student's lens layers: ``student_layers`` validated, or ``num_layers`` evenly spaced ones as in the
    paper; ``num_layers=None`` (not given) is :func:`default_num_pairs` of the student's depth, while an explicit
    ``num_layers`` the student is too shallow for is an error.

    Needs only the student's depth, so it can run before any weights are read (a too-shallow student is
    refused before the teacher loads).
    """
    if student_layers is None:
        if num_layers is None:
            num_layers = default_num_pairs(student_num_layers)
            if num_layers < 1:
                raise ValueError(
                    f"the student has {student_num_layers} layer, so the lens has no intermediate layer to map: "
                    "set lens_weight=0 (and feature_weight=0), or pass lens_student_layers/lens_teacher_layers."
                )
        if num_layers < 1:
            raise ValueError(f"lens_num_layers={num_layers} must be at least 1 when the lens loss is on.")
        if student_num_layers < num_layers + 1:
            raise ValueError(
                f"the student has {student_num_layers} layers, too shallow for lens_num_layers={num_layers} "
                f"intermediate layers (it needs at least {num_layers + 1}): lower lens_num_layers (or drop it: "
                f"the default adapts to the student's depth) or pass lens_student_layers/lens_teacher_layers."
            )
        student_layers = paper_student_layers(student_num_layers, num_layers)
    student_layers = list(student_layers)
    if not student_layers:
        raise ValueError("lens_student_layers is empty: give at least one layer, or set lens_weight=0.")
    _check_indices(student_layers, student_num_layers, "lens_student_layers", "student")
    return student_layers


def resolve_layer_map(
    student_num_layers: int,
    teacher_num_layers: int,
    student_layers: Sequence[int] | None = None,
    teacher_layers: Sequence[int] | None = None,
    num_layers: int | None = None,
    kept_layers: Sequence[int] | None = None,
) -> list[LayerPair]:
    """(student, teacher) ``hidden_states`` index pairs for the lens loss.

    With explicit ``student_layers`` and ``teacher_layers`` these are validated and zipped. With
    neither, ``num_layers`` (K; None = :func:`default_num_pairs`, the paper's 5 where the student allows it)
    pairs follow the paper: e.g. 12→48 layers gives
    (2,8), (4,16), (6,24), (8,32), (10,40); 22→32 gives (4,5), (7,10), (11,16), (15,21), (18,26).
    With only ``student_layers``, the teacher layers are the proportional ones. With ``kept_layers`` (the
    teacher blocks a shrunk student was cut from, 0-based, one per student block) the teacher layers follow
    them instead: student index s pairs with teacher index ``kept_layers[s-1] + 1``.
    """
    for value, name in (
        (student_num_layers, "student_num_layers"),
        (teacher_num_layers, "teacher_num_layers"),
    ):
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1.")
    if teacher_layers is not None and student_layers is None:
        raise ValueError("lens_teacher_layers was given without lens_student_layers: give both, or neither.")
    student_layers = resolve_student_layers(student_num_layers, student_layers, num_layers)
    if teacher_layers is None and kept_layers is not None:
        teacher_layers = kept_teacher_layers(student_layers, kept_layers, student_num_layers)
    if teacher_layers is None:
        teacher_layers = [
            proportional_teacher_layer(s, student_num_layers, teacher_num_layers) for s in student_layers
        ]
        if min(teacher_layers) < 1:
            raise ValueError(
                f"the teacher ({teacher_num_layers} layers) is too shallow for student layers {student_layers}: "
                "pass lens_teacher_layers explicitly."
            )
    teacher_layers = list(teacher_layers)
    if len(teacher_layers) != len(student_layers):
        raise ValueError(
            f"lens_student_layers has {len(student_layers)} entries but lens_teacher_layers has "
            f"{len(teacher_layers)}: give one teacher layer per student layer."
        )
    _check_indices(teacher_layers, teacher_num_layers, "lens_teacher_layers", "teacher")
    pairs = list(zip(student_layers, teacher_layers))
    check_distinct_pairs(pairs)
    return pairs


@dataclass(frozen=True)
class LayerMapFields:
    """A run's lens fields that choose its layer pairs (``DistillLensConfig``'s ``lens_layer_map``,
    ``lens_num_layers``, ``lens_student_layers``, ``lens_teacher_layers``).

    Attributes:
        layer_map: the automatic map's teacher layers: ``paper`` (the same relative depth) or ``shrunk``.
        num_layers: K, the automatic map's number of pairs; None = :func:`default_num_pairs` (``min(5, L_S - 1)``).
        student_layers: explicit student ``hidden_states`` indices, or None.
        teacher_layers: explicit teacher indices, one per student layer, or None.
    """

    layer_map: str = "paper"
    num_layers: int | None = None
    student_layers: Sequence[int] | None = None
    teacher_layers: Sequence[int] | None = None

    @classmethod
    def of(cls, settings: Any) -> LayerMapFields:
        """The fields of an object (a config, ``distillens lens``'s arguments) or a mapping (a run record) that
        holds them as ``lens_*``; a missing one is its default (a missing or None ``lens_layer_map``: ``paper``)."""

        def value(name: str) -> Any:
            return settings.get(name) if isinstance(settings, Mapping) else getattr(settings, name, None)

        return cls(
            layer_map=value("lens_layer_map") or "paper",
            num_layers=value("lens_num_layers"),
            student_layers=value("lens_student_layers"),
            teacher_layers=value("lens_teacher_layers"),
        )


def resolve_run_layer_map(
    student_num_layers: int,
    teacher_num_layers: int,
    fields: LayerMapFields,
    kept_layers: Sequence[int] | None = None,
    *,
    required: bool = True,
) -> list[LayerPair]:
    """A run's (student, teacher) ``hidden_states`` pairs: the one resolution behind the trainer (a live teacher
    or a cache), ``distillens train``, ``cache-teacher``, ``lens`` and the demo (:func:`resolve_layer_map` of the
    fields, one default).

    Args:
        student_num_layers: L_S, the student's block count.
        teacher_num_layers: L_T, the teacher's block count.
        fields: the run's lens fields (:class:`LayerMapFields`).
        kept_layers: the teacher blocks (0-based) the student was cut from, as ``distillens shrink`` recorded
            them in its config (None: no record); read only for ``layer_map='shrunk'``, which needs them.
        required: False where the pairs are optional (a lens profile): a student without an intermediate layer,
            with no layers or number of pairs asked for, then has no pairs ([]) instead of the error.
    Returns:
        The pairs, in order, each listed once.
    """
    if (
        not required
        and fields.student_layers is None
        and fields.num_layers is None
        and default_num_pairs(student_num_layers) < 1
    ):
        return []
    return resolve_layer_map(
        student_num_layers,
        teacher_num_layers,
        fields.student_layers,
        fields.teacher_layers,
        fields.num_layers,
        kept_layers=kept_layers_for_map(fields.layer_map, kept_layers),
    )


def check_distinct_layer_lists(
    student_layers: Sequence[int] | None, teacher_layers: Sequence[int] | None
) -> None:
    """:func:`check_distinct_pairs` of the lists as given, before any model is read; without teacher layers
    (derived from the student's) a repeated student layer is a repeated pair."""
    if student_layers is None:
        return
    if teacher_layers is not None:
        check_distinct_pairs(list(zip(student_layers, teacher_layers)))
        return
    repeated = next((s for i, s in enumerate(student_layers) if s in student_layers[:i]), None)
    if repeated is not None:
        raise ValueError(
            f"lens_student_layers={list(student_layers)} lists layer {repeated} twice: list each layer once."
        )


def check_distinct_pairs(pairs: Sequence[LayerPair]) -> None:
    """ValueError (one line) when a (student, teacher) lens pair is listed twice: it would count twice."""
    seen: set[LayerPair] = set()
    for pair in pairs:
        if pair in seen:
            raise ValueError(
                f"the lens pair (student layer {pair[0]}, teacher layer {pair[1]}) is listed twice in "
                f"{[tuple(p) for p in pairs]}: list each pair once in lens_student_layers/lens_teacher_layers."
            )
        seen.add(pair)
