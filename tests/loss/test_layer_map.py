"""Tests for ``distillens_trainer.loss.layer_map.resolve_layer_map``."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from distillens_trainer.loss.layer_map import (
    LayerMapFields,
    adapted_num_pairs_note,
    default_num_pairs,
    resolve_layer_map,
    resolve_run_layer_map,
    resolve_student_layers,
)

# --------------------------------------------------------------------------------------------------
# The paper's layer pairs.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("student_num_layers", "teacher_num_layers", "expected"),
    [
        (12, 48, [(2, 8), (4, 16), (6, 24), (8, 32), (10, 40)]),  # GPT-2 small <- GPT-2 XL
        (24, 48, [(4, 8), (8, 16), (12, 24), (16, 32), (20, 40)]),  # GPT-2 medium <- GPT-2 XL
        (22, 32, [(4, 5), (7, 10), (11, 16), (15, 21), (18, 26)]),  # TinyLlama <- Llama-2 7B
    ],
)
def test_default_pairs_reproduce_the_paper(student_num_layers, teacher_num_layers, expected):
    assert resolve_layer_map(student_num_layers, teacher_num_layers) == expected


def test_paper_student_layers_round_halves_up():
    # 5 layers, K = 1: 5/2 = 2.5 -> 3 (Python's banker's round(2.5) would give 2).
    assert resolve_layer_map(5, 10, num_layers=1) == [(3, 6)]
    # 9 layers, K = 3: 9/4 = 2.25 -> 2, 18/4 = 4.5 -> 5, 27/4 = 6.75 -> 7.
    assert [s for s, _ in resolve_layer_map(9, 9, num_layers=3)] == [2, 5, 7]


def test_proportional_teacher_layer_floors():
    # 22 -> 32: 4·32/22 = 5.82 -> 5 (floor, not round to 6).
    assert resolve_layer_map(22, 32)[0] == (4, 5)


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def independent_layer_map(student_num_layers, teacher_num_layers, num_layers):
    """s_k = round-half-up(k·L_S/(K+1)), t = floor(s·L_T/L_S), in exact rational arithmetic."""
    pairs = []
    for k in range(1, num_layers + 1):
        s = _round_half_up(Fraction(k * student_num_layers, num_layers + 1))
        t = math.floor(Fraction(s * teacher_num_layers, student_num_layers))
        pairs.append((s, t))
    return pairs


GRID = [
    (ls, lt, k)
    for ls in (2, 3, 5, 6, 7, 11, 12, 16, 22, 24, 28, 32, 36, 40)
    for lt in (1, 2, 6, 12, 24, 28, 32, 48, 80)
    for k in (1, 2, 3, 4, 5, 7)
]


def test_default_pairs_match_independent_rational_implementation():
    checked = 0
    for ls, lt, k in GRID:
        if ls < k + 1:
            with pytest.raises(ValueError, match="too shallow"):
                resolve_layer_map(ls, lt, num_layers=k)
            continue
        expected = independent_layer_map(ls, lt, k)
        if min(t for _, t in expected) < 1:
            # The proportional teacher layer would be the embedding output.
            with pytest.raises(ValueError, match="lens_teacher_layers"):
                resolve_layer_map(ls, lt, num_layers=k)
            continue
        got = resolve_layer_map(ls, lt, num_layers=k)
        assert got == expected, (ls, lt, k)
        students = [s for s, _ in got]
        assert len(got) == k
        assert students == sorted(set(students)), "student layers must be distinct and increasing"
        assert all(1 <= s <= ls and 1 <= t <= lt for s, t in got)
        checked += 1
    assert checked > 300


def test_returns_list_of_int_tuples():
    pairs = resolve_layer_map(12, 48)
    assert isinstance(pairs, list)
    assert all(type(p) is tuple and len(p) == 2 and all(type(i) is int for i in p) for p in pairs)


# --------------------------------------------------------------------------------------------------
# Explicit layers.
# --------------------------------------------------------------------------------------------------


def test_explicit_student_and_teacher_layers_are_zipped():
    assert resolve_layer_map(12, 48, student_layers=[3, 12], teacher_layers=[10, 48]) == [(3, 10), (12, 48)]


def test_explicit_layers_keep_the_given_order_and_accept_tuples():
    assert resolve_layer_map(12, 48, student_layers=(6, 2), teacher_layers=(1, 7)) == [(6, 1), (2, 7)]


def test_explicit_layers_ignore_num_layers():
    assert resolve_layer_map(4, 4, student_layers=[1, 2, 3], teacher_layers=[1, 2, 3], num_layers=9) == [
        (1, 1),
        (2, 2),
        (3, 3),
    ]


def test_only_student_layers_get_proportional_teacher_layers():
    assert resolve_layer_map(12, 48, student_layers=[1, 5, 12]) == [(1, 4), (5, 20), (12, 48)]
    # floor(s·L_T/L_S): 22 -> 32, s = 3: 96/22 = 4.36 -> 4; s = 22 -> 32.
    assert resolve_layer_map(22, 32, student_layers=[3, 22]) == [(3, 4), (22, 32)]


def test_only_student_layers_on_a_shallow_student_is_allowed():
    # The "too shallow for K" check only applies to the automatic map.
    assert resolve_layer_map(2, 4, student_layers=[1, 2], num_layers=5) == [(1, 2), (2, 4)]


# --------------------------------------------------------------------------------------------------
# Errors: ValueError naming the offending field.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(student_layers=[2, 4], teacher_layers=[8]), "lens_teacher_layers"),
        (dict(student_layers=[2], teacher_layers=[8, 16]), "lens_student_layers"),
        (dict(student_layers=[0, 4], teacher_layers=[8, 16]), "lens_student_layers"),
        (dict(student_layers=[2, 4], teacher_layers=[0, 16]), "lens_teacher_layers"),
        (dict(student_layers=[0]), "lens_student_layers"),
        (dict(student_layers=[-1]), "lens_student_layers"),
        (dict(student_layers=[13]), "lens_student_layers"),
        (dict(student_layers=[2, 4], teacher_layers=[8, 49]), "lens_teacher_layers"),
        (dict(teacher_layers=[8, 16]), "lens_teacher_layers"),
        (dict(teacher_layers=[8, 16]), "lens_student_layers"),
        (dict(student_layers=[]), "lens_student_layers"),
        (dict(student_layers=[], teacher_layers=[]), "lens_student_layers"),
        (dict(student_layers=[True]), "lens_student_layers"),
        (dict(student_layers=[2.0]), "lens_student_layers"),
        (dict(num_layers=12), "lens_num_layers"),
        (dict(num_layers=0), "lens_num_layers"),
    ],
    ids=[
        "lengths-differ-teacher-short",
        "lengths-differ-student-short",
        "student-index-0",
        "teacher-index-0",
        "student-only-index-0",
        "student-negative",
        "student-index-past-last-layer",
        "teacher-index-past-last-layer",
        "teacher-without-student-names-teacher",
        "teacher-without-student-names-student",
        "empty-student-list",
        "empty-both-lists",
        "bool-index",
        "float-index",
        "student-too-shallow-for-k",
        "k-zero",
    ],
)
def test_invalid_layers_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        resolve_layer_map(12, 48, **kwargs)


def test_student_too_shallow_for_k_says_so():
    with pytest.raises(ValueError, match="too shallow") as info:
        resolve_layer_map(5, 48, num_layers=5)
    assert "lens_num_layers=5" in str(info.value)
    # K + 1 layers is just enough: every block but the last.
    assert resolve_layer_map(6, 12, num_layers=5) == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10)]


def test_teacher_too_shallow_for_proportional_layers_asks_for_explicit_teacher_layers():
    # floor(1·2/12) = 0 would be the embedding output.
    with pytest.raises(ValueError, match="lens_teacher_layers"):
        resolve_layer_map(12, 2, student_layers=[1, 12])


def test_index_equal_to_num_layers_is_valid_but_one_past_is_not():
    assert resolve_layer_map(12, 48, student_layers=[12], teacher_layers=[48]) == [(12, 48)]
    with pytest.raises(ValueError, match="12 layers"):
        resolve_layer_map(12, 48, student_layers=[13], teacher_layers=[48])


@pytest.mark.parametrize(
    ("student_num_layers", "teacher_num_layers", "field"),
    [(0, 48, "student_num_layers"), (12, 0, "teacher_num_layers")],
)
def test_non_positive_model_depth_raises(student_num_layers, teacher_num_layers, field):
    with pytest.raises(ValueError, match=field):
        resolve_layer_map(student_num_layers, teacher_num_layers)


def test_a_repeated_lens_pair_is_refused_in_one_line():
    with pytest.raises(
        ValueError, match=r"the lens pair \(student layer 2, teacher layer 4\) is listed twice"
    ):
        resolve_layer_map(4, 8, student_layers=[2, 2], teacher_layers=[4, 4])
    with pytest.raises(
        ValueError, match=r"the lens pair \(student layer 2, teacher layer 4\) is listed twice"
    ):
        resolve_layer_map(4, 8, student_layers=[2, 2])  # proportional teacher layers repeat the pair
    assert resolve_layer_map(4, 8, student_layers=[2, 2], teacher_layers=[3, 4]) == [(2, 3), (2, 4)]


# --------------------------------------------------------------------------------------------------
# Shallow students: lens_num_layers not given adapts to the student's depth.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("student_num_layers", "expected"),
    [
        (2, [(1, 15)]),  # one pair: every block but the last
        (3, [(1, 10), (2, 20)]),
        (5, [(1, 6), (2, 12), (3, 18), (4, 24)]),
        (6, [(1, 5), (2, 10), (3, 15), (4, 20), (5, 25)]),  # the paper's 5 from 6 layers on
        (12, [(2, 5), (4, 10), (6, 15), (8, 20), (10, 25)]),
    ],
)
def test_without_lens_num_layers_a_shallow_student_gets_one_pair_per_block_but_the_last(
    student_num_layers, expected
):
    assert default_num_pairs(student_num_layers) == min(5, student_num_layers - 1)
    assert resolve_layer_map(student_num_layers, 30) == expected
    assert resolve_layer_map(student_num_layers, 30, num_layers=None) == expected
    if student_num_layers >= 6:  # where the student allows it, the default is the paper's K = 5
        assert expected == resolve_layer_map(student_num_layers, 30, num_layers=5)


def test_the_adapted_map_is_valid_for_every_depth_and_said_only_when_shortened():
    for student_num_layers in range(2, 40):
        pairs = resolve_layer_map(student_num_layers, 2 * student_num_layers)
        students = [s for s, _ in pairs]
        assert len(pairs) == min(5, student_num_layers - 1)
        assert students == sorted(set(students)) and all(1 <= s < student_num_layers for s in students)
        note = adapted_num_pairs_note(student_num_layers, None)
        assert (note is None) == (student_num_layers >= 6)
        assert adapted_num_pairs_note(student_num_layers, 2) is None  # an explicit value needs no note
    assert "2 layers, so the lens maps 1 pair " in adapted_num_pairs_note(2, None)


def test_an_explicit_lens_num_layers_that_does_not_fit_stays_an_error():
    with pytest.raises(ValueError, match="too shallow for lens_num_layers=5"):
        resolve_layer_map(2, 30, num_layers=5)
    with pytest.raises(ValueError, match="too shallow for lens_num_layers=2"):
        resolve_student_layers(2, num_layers=2)


def test_a_one_layer_student_has_no_intermediate_layer_for_the_lens():
    with pytest.raises(ValueError, match="no intermediate layer to map: set lens_weight=0"):
        resolve_layer_map(1, 4)
    assert resolve_layer_map(1, 4, student_layers=[1]) == [(1, 4)]  # explicit layers still work


# --------------------------------------------------------------------------------------------------
# A run's pairs: one resolution for the trainer, cache-teacher, lens and the demo.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        LayerMapFields(),
        LayerMapFields(num_layers=2),
        LayerMapFields(student_layers=[1, 3]),
        LayerMapFields(student_layers=[1, 3], teacher_layers=[2, 7]),
        LayerMapFields(layer_map="shrunk"),
        LayerMapFields(layer_map="shrunk", num_layers=1),
    ],
)
def test_the_run_layer_map_is_resolve_layer_map_of_the_fields(fields):
    kept = [0, 2, 5, 7]  # a 4-block student cut from an 8-block teacher
    expected = resolve_layer_map(
        4,
        8,
        fields.student_layers,
        fields.teacher_layers,
        fields.num_layers,
        kept_layers=kept if fields.layer_map == "shrunk" else None,
    )
    assert resolve_run_layer_map(4, 8, fields, kept) == expected
    if fields.layer_map == "paper":  # the paper's map reads no record
        assert resolve_run_layer_map(4, 8, fields, None) == expected


def test_the_shrunk_map_needs_the_students_record():
    with pytest.raises(
        ValueError, match="lens_layer_map='shrunk' needs a student written by 'distillens shrink'"
    ):
        resolve_run_layer_map(4, 8, LayerMapFields(layer_map="shrunk"), None)
    assert resolve_run_layer_map(3, 4, LayerMapFields(layer_map="shrunk"), [0, 2, 3]) == [(1, 1), (2, 3)]


def test_the_fields_are_read_from_a_config_or_a_record_and_the_map_defaults_to_the_papers():
    class Settings:
        lens_layer_map = None  # distillens lens without --lens_layer_map
        lens_num_layers = 2
        lens_student_layers = None
        lens_teacher_layers = None

    assert LayerMapFields.of(Settings()) == LayerMapFields(num_layers=2)
    record = {"lens_layer_map": "shrunk", "lens_num_layers": None, "lens_weight": 1.0}
    assert LayerMapFields.of(record) == LayerMapFields(layer_map="shrunk")
    assert LayerMapFields.of({}) == LayerMapFields()


def test_a_profile_of_a_one_block_student_has_no_pairs_where_training_refuses():
    with pytest.raises(ValueError, match="no intermediate layer to map"):
        resolve_run_layer_map(1, 4, LayerMapFields())
    assert resolve_run_layer_map(1, 4, LayerMapFields(), required=False) == []
    assert resolve_run_layer_map(1, 4, LayerMapFields(student_layers=[1]), required=False) == [(1, 4)]
    with pytest.raises(ValueError, match="too shallow for lens_num_layers=1"):
        resolve_run_layer_map(1, 4, LayerMapFields(num_layers=1), required=False)
    assert resolve_run_layer_map(3, 6, LayerMapFields(), required=False) == resolve_layer_map(3, 6)


def test_the_old_shrunk_kept_layers_still_works_and_warns():
    from types import SimpleNamespace

    from distillens_trainer.loss.layer_map import shrunk_kept_layers

    with pytest.warns(DeprecationWarning, match="recorded_kept_layers"):
        assert shrunk_kept_layers(SimpleNamespace(distillens_kept_layers=[0, 2]), "shrunk") == [0, 2]
    with pytest.warns(DeprecationWarning):
        assert shrunk_kept_layers(SimpleNamespace(), "paper") is None
