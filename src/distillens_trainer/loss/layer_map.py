"""Which student layer imitates which teacher layer through the logit lens.

Indices follow the Hugging Face ``hidden_states`` convention: 0 is the embedding output, ``i`` the
residual stream after block ``i``, and ``num_layers`` the last block's output (already normed by HF).
"""

from __future__ import annotations

from collections.abc import Sequence
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


def shrunk_kept_layers(student_config: Any, lens_layer_map: str) -> list[int] | None:
    """The teacher blocks a shrunk student was cut from (its config's record), for ``lens_layer_map='shrunk'``;
    None for the paper's map. ValueError when the student was not written by ``distillens shrink``."""
    if lens_layer_map != "shrunk":
        return None
    kept = getattr(student_config, KEPT_LAYERS_CONFIG_KEY, None)
    if kept is None:
        raise ValueError(
            f"lens_layer_map='shrunk' needs a student written by 'distillens shrink' (its config records "
            f"{KEPT_LAYERS_CONFIG_KEY}); this one has none: use lens_layer_map='paper'."
        )
    return list(kept)


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
