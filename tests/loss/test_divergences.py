"""Tests for ``distillens_trainer.loss.divergences.token_divergence``.

Hand-computed values on 2- and 3-token vocabularies pin the conventions (which side is which, β's
side, no T² rescale); a naive float64 reference pins everything else over shapes and dtypes.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distillens_trainer.loss.divergences import (
    DIVERGENCE_NAMES,
    DIVERGENCES,
    LOG_PROB_FLOOR,
    LayerPairs,
    check_divergence_name,
    log_probs,
    mixture_entropy_sums,
    token_divergence,
)
from distillens_trainer.loss.fused_math import MASKED_DIVERGENCES

REPO = Path(__file__).resolve().parents[2]

NAMES = ("fkl", "rkl", "skl", "jsd", "tvd")
LN2 = math.log(2.0)
LN3 = math.log(3.0)
NEG_INF = float("-inf")

# The library computes in fp32. bf16/fp16 -> fp32 is exact, so once the reference is computed from the
# SAME rounded inputs, the input dtype's own rounding cancels and only fp32 arithmetic error is left:
# a few ulps of each O(1) term, summed over at most 50 vocabulary entries.
FP32_ATOL = 2e-5
FP32_RTOL = 1e-4


# --------------------------------------------------------------------------------------------------
# Naive float64 reference (plain softmax / log, no flooring, no masking).
# --------------------------------------------------------------------------------------------------


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def naive_divergence(name, student_logits, teacher_logits, temperature=1.0, beta=0.5):
    s = torch.softmax(student_logits.double() / temperature, dim=-1)
    t = torch.softmax(teacher_logits.double() / temperature, dim=-1)
    if name == "fkl":
        return _kl(t, s)
    if name == "rkl":
        return _kl(s, t)
    if name == "skl":
        return _kl(t, s) + _kl(s, t)
    if name == "jsd":
        m = beta * t + (1 - beta) * s
        return beta * _kl(t, m) + (1 - beta) * _kl(s, m)
    if name == "tvd":
        return 0.5 * (t - s).abs().sum(-1)
    raise AssertionError(name)


def _logits(shape, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


# --------------------------------------------------------------------------------------------------
# Hand-computed values.
# Student s = softmax([0, 0]) = [1/2, 1/2]; teacher t = softmax([0, ln 3]) = [1/4, 3/4].
# --------------------------------------------------------------------------------------------------

S2 = torch.tensor([[0.0, 0.0]])
T2 = torch.tensor([[0.0, LN3]])
KL_T_S = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(t‖s) ≈ 0.1308
KL_S_T = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(s‖t) ≈ 0.1438
# β = ½: m = [3/8, 5/8]
JSD_HALF = 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)) + 0.5 * (
    0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)
)
# β = ¼ weights the TEACHER: m = ¼·t + ¾·s = [7/16, 9/16]
JSD_QUARTER = 0.25 * (0.25 * math.log(0.25 / (7 / 16)) + 0.75 * math.log(0.75 / (9 / 16))) + 0.75 * (
    0.5 * math.log(0.5 / (7 / 16)) + 0.5 * math.log(0.5 / (9 / 16))
)
TVD = 0.5 * (abs(0.25 - 0.5) + abs(0.75 - 0.5))  # = 1/4

HAND_2 = {"fkl": KL_T_S, "rkl": KL_S_T, "skl": KL_T_S + KL_S_T, "jsd": JSD_HALF, "tvd": TVD}


def test_every_offered_name_computes_its_own_documented_divergence():
    # DIVERGENCE_NAMES is what the config and the command line offer: each must be accepted and compute
    # its own hand-computed value (no alias, no fall-through to a default), and all five must be offered.
    computed = {name: token_divergence(name, S2, T2).item() for name in DIVERGENCE_NAMES}
    assert computed == pytest.approx(HAND_2, abs=1e-6)
    assert len(set(HAND_2.values())) == len(NAMES)  # five different values: a swapped name would show


@pytest.mark.parametrize("name", NAMES)
def test_matches_hand_computed_value_on_two_token_vocabulary(name):
    out = token_divergence(name, S2, T2)
    assert out.shape == (1,)
    torch.testing.assert_close(out, torch.tensor([HAND_2[name]]), atol=1e-6, rtol=1e-6)


def test_forward_kl_is_kl_of_teacher_from_student():
    # KL(t‖s) and KL(s‖t) differ here (0.1308 vs 0.1438), so swapping the sides would fail.
    assert abs(KL_T_S - KL_S_T) > 1e-2
    torch.testing.assert_close(token_divergence("fkl", S2, T2), torch.tensor([KL_T_S]))


def test_reverse_kl_is_kl_of_student_from_teacher():
    torch.testing.assert_close(token_divergence("rkl", S2, T2), torch.tensor([KL_S_T]))


def test_symmetric_kl_is_sum_of_forward_and_reverse_kl():
    torch.testing.assert_close(token_divergence("skl", S2, T2), torch.tensor([KL_T_S + KL_S_T]))


def test_total_variation_is_half_l1_distance():
    torch.testing.assert_close(token_divergence("tvd", S2, T2), torch.tensor([0.25]))


def test_jsd_half_matches_textbook_jensen_shannon():
    # Textbook JSD(P, Q) = ½·KL(P‖M) + ½·KL(Q‖M), M = ½(P + Q), written from scratch.
    p, q = [0.25, 0.75], [0.5, 0.5]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    textbook = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(
        b * math.log(b / c) for b, c in zip(q, m)
    )
    out = token_divergence("jsd", S2, T2, beta=0.5)
    torch.testing.assert_close(out, torch.tensor([textbook]), atol=1e-7, rtol=1e-6)


def test_jsd_beta_weights_the_teacher_side():
    out = token_divergence("jsd", S2, T2, beta=0.25)
    torch.testing.assert_close(out, torch.tensor([JSD_QUARTER]), atol=1e-7, rtol=1e-6)
    # Generalised JSD: JSD_β(s, t) = JSD_{1-β}(t, s), and here ¼ ≠ ¾ gives a different number.
    swapped = token_divergence("jsd", T2, S2, beta=0.75)
    torch.testing.assert_close(out, swapped)
    assert abs(token_divergence("jsd", S2, T2, beta=0.75).item() - JSD_QUARTER) > 1e-3


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_with_beta_zero_or_one_is_zero(beta):
    student = _logits([4, 6], seed=1).requires_grad_(True)
    teacher = _logits([4, 6], seed=2)
    out = token_divergence("jsd", student, teacher, beta=beta)
    torch.testing.assert_close(out, torch.zeros(4))
    out.sum().backward()  # still a graph node, so a weight-0 term does not break backward
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_matches_hand_computed_values_on_three_token_vocabulary():
    # t = softmax([0, ln 2, ln 5]) = [1/8, 2/8, 5/8]; s = softmax([ln 2, ln 3, ln 3]) = [2/8, 3/8, 3/8].
    teacher = torch.tensor([[0.0, LN2, math.log(5.0)]])
    student = torch.tensor([[LN2, LN3, LN3]])
    t, s = [1 / 8, 2 / 8, 5 / 8], [2 / 8, 3 / 8, 3 / 8]
    fkl = (1 / 8) * math.log(1 / 2) + (2 / 8) * math.log(2 / 3) + (5 / 8) * math.log(5 / 3)
    rkl = (2 / 8) * math.log(2) + (3 / 8) * math.log(3 / 2) + (3 / 8) * math.log(3 / 5)
    m = [(a + b) / 2 for a, b in zip(t, s)]  # [3/16, 5/16, 8/16]
    jsd = 0.5 * (
        (1 / 8) * math.log((1 / 8) / (3 / 16))
        + (2 / 8) * math.log((2 / 8) / (5 / 16))
        + (5 / 8) * math.log((5 / 8) / (8 / 16))
    ) + 0.5 * (
        (2 / 8) * math.log((2 / 8) / (3 / 16))
        + (3 / 8) * math.log((3 / 8) / (5 / 16))
        + (3 / 8) * math.log((3 / 8) / (8 / 16))
    )
    assert m == [3 / 16, 5 / 16, 8 / 16]
    expected = {"fkl": fkl, "rkl": rkl, "skl": fkl + rkl, "jsd": jsd, "tvd": 0.25}
    for name, value in expected.items():
        out = token_divergence(name, student, teacher)
        torch.testing.assert_close(out, torch.tensor([value]), atol=1e-6, rtol=1e-6, msg=name)


def test_jsd_of_disjoint_distributions_reaches_ln2_and_tvd_reaches_one():
    student = torch.tensor([[0.0, NEG_INF]])
    teacher = torch.tensor([[NEG_INF, 0.0]])
    torch.testing.assert_close(token_divergence("jsd", student, teacher), torch.tensor([LN2]))
    torch.testing.assert_close(token_divergence("tvd", student, teacher), torch.tensor([1.0]))


def test_jsd_of_nearly_disjoint_distributions_approaches_but_does_not_exceed_ln2():
    student = torch.tensor([[0.0, -30.0], [0.0, -10.0], [0.0, -3.0]])
    teacher = student.flip(-1)
    out = token_divergence("jsd", student, teacher)
    assert (out <= LN2 + 1e-6).all()
    torch.testing.assert_close(out[0], torch.tensor(LN2), atol=1e-6, rtol=0)
    # Less separated rows sit strictly below the bound, in order.
    assert out[2] < out[1] < out[0]
    # Random rows are bounded by ln 2 too.
    rand = token_divergence("jsd", _logits([64, 9], seed=3, scale=8), _logits([64, 9], seed=4, scale=8))
    assert (rand <= LN2 + 1e-6).all()


@pytest.mark.parametrize("name", NAMES)
def test_temperature_divides_both_logits_without_t_squared_rescale(name):
    # T = 2 on [0, 2 ln 3] gives the same t = [1/4, 3/4] as before: the hand value, not 4× it.
    out = token_divergence(name, 2.0 * S2, 2.0 * T2, temperature=2.0)
    torch.testing.assert_close(out, torch.tensor([HAND_2[name]]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [0.5, 2.0, 3.7])
def test_temperature_equals_dividing_the_logits(name, temperature):
    student, teacher = _logits([3, 4, 13], seed=5), _logits([3, 4, 13], seed=6)
    out = token_divergence(name, student, teacher, temperature=temperature, beta=0.3)
    ref = token_divergence(name, student / temperature, teacher / temperature, beta=0.3)
    torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------------------------------
# Naive-reference comparisons over names × shapes × dtypes.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 11), (1, 1, 50)], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_matches_naive_float64_reference(name, shape, dtype):
    student = _logits(shape, seed=10, dtype=dtype)
    teacher = _logits(shape, seed=11, dtype=dtype)
    out = token_divergence(name, student, teacher)
    assert out.dtype == torch.float32
    assert out.shape == shape[:-1]
    ref = naive_divergence(name, student, teacher)  # from the same rounded inputs
    torch.testing.assert_close(out.double(), ref, atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("beta", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_jsd_matches_naive_reference_for_beta_and_temperature(beta, temperature):
    student, teacher = _logits([6, 17], seed=12), _logits([6, 17], seed=13)
    out = token_divergence("jsd", student, teacher, beta=beta, temperature=temperature)
    ref = naive_divergence("jsd", student, teacher, beta=beta, temperature=temperature)
    torch.testing.assert_close(out.double(), ref, atol=FP32_ATOL, rtol=FP32_RTOL)


# --------------------------------------------------------------------------------------------------
# Properties.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_divergence_of_a_distribution_from_itself_is_zero(name):
    x = _logits([4, 5, 23], seed=20)
    for beta in (0.5, 0.2):
        out = token_divergence(name, x, x.clone(), beta=beta)
        torch.testing.assert_close(out, torch.zeros(4, 5), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_divergences_are_non_negative(name):
    student, teacher = _logits([32, 19], seed=21), _logits([32, 19], seed=22)
    assert (token_divergence(name, student, teacher) >= 0).all()
    near = teacher + 1e-3 * _logits([32, 19], seed=23)  # tiny divergences, where rounding could go < 0
    assert (token_divergence(name, near, teacher) >= -1e-6).all()


def test_forward_and_reverse_kl_are_asymmetric():
    student, teacher = _logits([8, 10], seed=24), _logits([8, 10], seed=25)
    fkl = token_divergence("fkl", student, teacher)
    rkl = token_divergence("rkl", student, teacher)
    assert (fkl - rkl).abs().max() > 1e-2
    # Swapping the arguments swaps the two.
    torch.testing.assert_close(token_divergence("fkl", teacher, student), rkl)
    torch.testing.assert_close(token_divergence("rkl", teacher, student), fkl)


@pytest.mark.parametrize("name", ["skl", "jsd", "tvd"])
def test_symmetric_divergences_do_not_depend_on_argument_order(name):
    student, teacher = _logits([8, 10], seed=26), _logits([8, 10], seed=27)
    forward = token_divergence(name, student, teacher, beta=0.5)
    backward = token_divergence(name, teacher, student, beta=0.5)
    torch.testing.assert_close(forward, backward)


def test_jsd_with_unequal_beta_is_not_symmetric():
    student, teacher = _logits([8, 10], seed=28), _logits([8, 10], seed=29)
    a = token_divergence("jsd", student, teacher, beta=0.2)
    b = token_divergence("jsd", teacher, student, beta=0.2)
    assert (a - b).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# -inf handling (masked vocabulary entries) and finite gradients.
# --------------------------------------------------------------------------------------------------


def _assert_finite_student_grad(name, student, teacher, **kwargs):
    student = student.clone().requires_grad_(True)
    out = token_divergence(name, student, teacher, **kwargs)
    assert torch.isfinite(out).all(), out
    out.sum().backward()
    assert student.grad is not None
    assert not torch.isnan(student.grad).any(), student.grad
    assert torch.isfinite(student.grad).all(), student.grad
    return out.detach(), student.grad


@pytest.mark.parametrize("name", NAMES)
def test_shared_neg_inf_columns_equal_dropping_those_columns(name):
    student, teacher = _logits([4, 9], seed=30), _logits([4, 9], seed=31)
    masked = torch.tensor([1, 4, 8])
    kept = torch.tensor([i for i in range(9) if i not in masked.tolist()])
    s_masked, t_masked = student.clone(), teacher.clone()
    s_masked[:, masked] = NEG_INF
    t_masked[:, masked] = NEG_INF
    out, grad = _assert_finite_student_grad(name, s_masked, t_masked, beta=0.3)
    dropped = token_divergence(name, student[:, kept], teacher[:, kept], beta=0.3)
    torch.testing.assert_close(out, dropped)
    torch.testing.assert_close(
        out.double(),
        naive_divergence(name, student[:, kept], teacher[:, kept], beta=0.3),
        atol=FP32_ATOL,
        rtol=FP32_RTOL,
    )
    assert (grad[:, masked] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_neg_inf_in_student_where_teacher_has_mass_stays_finite(name):
    student, teacher = _logits([3, 6], seed=32), _logits([3, 6], seed=33)
    student[0, 2] = NEG_INF
    student[1, [0, 5]] = NEG_INF
    out, _ = _assert_finite_student_grad(name, student, teacher)
    assert (out >= 0).all()
    # The unmasked row is untouched.
    torch.testing.assert_close(out[2], token_divergence(name, student[2:], teacher[2:])[0])


@pytest.mark.parametrize("name", NAMES)
def test_neg_inf_in_teacher_where_student_has_mass_stays_finite(name):
    student, teacher = _logits([3, 6], seed=34), _logits([3, 6], seed=35)
    teacher[0, 2] = NEG_INF
    teacher[1, [0, 5]] = NEG_INF
    out, _ = _assert_finite_student_grad(name, student, teacher)
    assert (out >= 0).all()


@pytest.mark.parametrize("side", ["student", "teacher", "both"])
@pytest.mark.parametrize("name", NAMES)
def test_whole_neg_inf_row_gives_zero_and_leaves_other_rows_unchanged(name, side):
    student, teacher = _logits([4, 7], seed=36), _logits([4, 7], seed=37)
    reference = token_divergence(name, student, teacher, temperature=1.5)
    if side in ("student", "both"):
        student[1] = NEG_INF
    if side in ("teacher", "both"):
        teacher[1] = NEG_INF
    out, grad = _assert_finite_student_grad(name, student, teacher, temperature=1.5)
    assert out[1] == 0
    keep = torch.tensor([0, 2, 3])
    torch.testing.assert_close(out[keep], reference[keep])
    assert (grad[1] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_whole_neg_inf_row_in_a_low_precision_batch(name):
    student = _logits([2, 3, 5], seed=38, dtype=torch.bfloat16)
    teacher = _logits([2, 3, 5], seed=39, dtype=torch.bfloat16)
    student[0, 1] = NEG_INF
    teacher[1, 2] = NEG_INF
    out, _ = _assert_finite_student_grad(name, student, teacher)
    assert out[0, 1] == 0 and out[1, 2] == 0
    assert out.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Gradients.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_on_student_and_teacher_logits(name):
    # float64 logits are computed in float64, so gradcheck runs at its own (tight) defaults
    student = _logits([3, 5], seed=40, scale=1.5, dtype=torch.float64).requires_grad_(True)
    teacher = _logits([3, 5], seed=41, scale=1.5, dtype=torch.float64).requires_grad_(True)

    def fn(s, t):
        out = token_divergence(name, s, t, temperature=1.3, beta=0.35)
        assert out.dtype == torch.float64
        return out

    assert torch.autograd.gradcheck(fn, (student, teacher))


@pytest.mark.parametrize("name", NAMES)
def test_float64_logits_match_the_naive_reference_to_float64_precision(name):
    student = _logits([6, 13], seed=44, dtype=torch.float64)
    teacher = _logits([6, 13], seed=45, dtype=torch.float64)
    out = token_divergence(name, student, teacher, temperature=0.8, beta=0.3)
    ref = naive_divergence(name, student, teacher, temperature=0.8, beta=0.3)
    # 256 ε of fp64 of the largest value: ~6e-14 relative, where fp32 arithmetic would be off by ~1e-7
    atol = 256 * torch.finfo(torch.float64).eps * float(ref.abs().max())
    torch.testing.assert_close(out, ref, rtol=0, atol=atol)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_student_gradient_matches_float64_reference_autograd(name, temperature):
    base = _logits([4, 11], seed=42)
    teacher = _logits([4, 11], seed=43)
    student = base.clone().requires_grad_(True)
    token_divergence(name, student, teacher, temperature=temperature, beta=0.3).sum().backward()
    student64 = base.double().requires_grad_(True)
    naive_divergence(name, student64, teacher, temperature=temperature, beta=0.3).sum().backward()
    torch.testing.assert_close(student.grad.double(), student64.grad, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------------------


def test_unknown_name_raises_value_error_listing_valid_names():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kl") as info:
        token_divergence("kl", x, x)
    for name in NAMES:
        assert name in str(info.value)


def test_shape_mismatch_raises_value_error():
    with pytest.raises(ValueError, match="shape"):
        token_divergence("rkl", torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="shape"):
        token_divergence("rkl", torch.zeros(2, 3), torch.zeros(3, 3))


@pytest.mark.parametrize("temperature", [0.0, -1.0, -1e-9])
def test_non_positive_temperature_raises_value_error(temperature):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="temperature"):
        token_divergence("jsd", x, x, temperature=temperature)


def test_nan_temperature_raises_value_error():
    student, teacher = _logits([2, 3], seed=50), _logits([2, 3], seed=51)
    with pytest.raises(ValueError, match="temperature"):
        token_divergence("rkl", student, teacher, temperature=float("nan"))


def test_an_unknown_name_is_refused_naming_the_field():
    with pytest.raises(
        ValueError, match=r"^lens_divergence='kl' is not a known divergence; choose one of fkl, rkl"
    ):
        check_divergence_name("kl", "lens_divergence")
    assert check_divergence_name("tvd") == "tvd"


# --------------------------------------------------------------------------------------------------
# The registry: one record per divergence, everything else derived from it.
# --------------------------------------------------------------------------------------------------


def test_the_offered_names_are_the_registry_in_its_order():
    assert DIVERGENCE_NAMES == tuple(DIVERGENCES) == NAMES
    assert all(record.name == name for name, record in DIVERGENCES.items())
    assert all(record.description.strip() for record in DIVERGENCES.values())


def _docs_divergence_table() -> dict[str, str]:
    """The ``| name | description |`` table of docs/objective.md, as name -> description (``\\|`` unescaped)."""
    lines = (REPO / "docs" / "objective.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("| name | description |") + 2  # the header, then the |---|---| line
    table: dict[str, str] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        name, description = line[1:-1].replace("\\|", "\0").split("|")
        table[name.strip().strip("`")] = description.strip().replace("\0", "|")
    return table


def test_the_docs_table_lists_exactly_the_registry_with_its_descriptions():
    expected = {name: record.description for name, record in DIVERGENCES.items()}
    assert _docs_divergence_table() == expected, (
        "update the table in docs/objective.md from divergences.DIVERGENCES"
    )
    assert list(_docs_divergence_table()) == list(DIVERGENCES)


@pytest.mark.parametrize("name", NAMES)
def test_masked_is_whether_the_gradient_survives_at_a_floored_student_entry(name):
    # The student gives token 1 no mass (its log-probability is floored), the teacher does. Without the floor's
    # clamp, the gradient w.r.t. λ_s there is -t·(...) for the KL-from-teacher kinds and s·(...) = 0 otherwise.
    log_s = log_probs(torch.tensor([[0.0, float("-inf"), 1.0]], dtype=torch.float64)).requires_grad_(True)
    log_t = log_probs(torch.tensor([[0.0, 1.0, 0.5]], dtype=torch.float64))
    assert log_s[0, 1].item() == LOG_PROB_FLOOR
    (grad,) = torch.autograd.grad(DIVERGENCES[name].value(log_s, log_t, beta=0.5).sum(), log_s)
    assert DIVERGENCES[name].masked == (grad[0, 1].item() != 0.0)
    assert (name in MASKED_DIVERGENCES) == DIVERGENCES[name].masked


@pytest.mark.parametrize("beta", [0.5, 0.2])
@pytest.mark.parametrize("name", NAMES)
def test_each_closed_form_gradient_is_the_autograd_gradient_of_its_value(name, beta):
    record = DIVERGENCES[name]
    log_s = log_probs(_logits([4, 7], seed=60, dtype=torch.float64)).requires_grad_(True)
    log_t = log_probs(_logits([4, 7], seed=61, dtype=torch.float64))
    value = record.value(log_s, log_t, beta=beta)
    (expected_grad,) = torch.autograd.grad(value.sum(), log_s)

    blocks = [x.detach().clone() for x in (log_s, log_s.exp(), log_t, log_t.exp())]
    mask = torch.empty(log_s.shape, dtype=torch.bool) if record.masked else None
    per_row, grad = record.value_and_grad_(*blocks, beta=beta, need_grad=True, mask=mask)

    torch.testing.assert_close(per_row, value.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-10)


def _string_literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def _layer_statistics(num_layers: int, num_tokens: int, vocab_size: int, seed: int) -> SimpleNamespace:
    """fp64 per-layer statistics (log_probs, probs, negentropy, mass) of random layers, one entry floored."""
    logits = _logits([num_layers, num_tokens, vocab_size], seed=seed, dtype=torch.float64)
    logits[0, 0, 1] = NEG_INF
    log_p = log_probs(logits)
    probs = log_p.exp()
    return SimpleNamespace(
        log_probs=log_p, probs=probs, negentropy=(probs * log_p).sum(dim=-1), mass=probs.sum(dim=-1)
    )


@pytest.mark.parametrize("mixture_sums", [None, mixture_entropy_sums], ids=["token_by_token", "all_tokens"])
@pytest.mark.parametrize("beta", [0.5, 0.2, 0.0])
@pytest.mark.parametrize("name", NAMES)
def test_each_per_pair_formula_is_its_value_on_every_pair(name, beta, mixture_sums):
    student, teacher = _layer_statistics(4, 6, 9, seed=70), _layer_statistics(3, 6, 9, seed=71)
    student_rows, teacher_rows = (
        [0, 1, 3, 2, 0, 1, 2],
        [2, 0, 1, 1, 0, 2, 2],
    )  # runs of consecutive rows, and not
    pairs = LayerPairs(
        student,
        teacher,
        student_rows,
        teacher_rows,
        torch.empty(2, 6, 9, dtype=torch.float64),
        mixture_sums=mixture_sums,
    )
    record = DIVERGENCES[name]
    expected = torch.stack(
        [
            record.value(student.log_probs[s], teacher.log_probs[t], beta=beta)
            for s, t in zip(student_rows, teacher_rows)
        ],
        dim=1,
    )  # [c, P]
    torch.testing.assert_close(record.per_pair(pairs, beta=beta), expected, atol=1e-12, rtol=1e-10)


def test_the_cross_terms_of_a_chunk_are_computed_once():
    student, teacher = _layer_statistics(2, 3, 5, seed=72), _layer_statistics(2, 3, 5, seed=73)
    pairs = LayerPairs(student, teacher, [0, 1], [1, 0], torch.empty(2, 3, 5, dtype=torch.float64))
    assert pairs.teacher_probs_dot_student_log_probs() is pairs.teacher_probs_dot_student_log_probs()
    assert pairs.student_probs_dot_teacher_log_probs() is pairs.student_probs_dot_teacher_log_probs()


def test_every_divergence_has_its_own_label_and_a_unit():
    labels = [record.label for record in DIVERGENCES.values()]
    assert all(label.strip() for label in labels) and len(set(labels)) == len(labels)
    assert {name: record.unit for name, record in DIVERGENCES.items()} == {
        "fkl": "nats",
        "rkl": "nats",
        "skl": "nats",
        "jsd": "nats",
        "tvd": "",
    }


def test_no_module_but_the_registry_names_a_divergence():
    package = REPO / "src" / "distillens_trainer"
    naming = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name != "divergences.py" and _string_literals(path) & set(DIVERGENCES)
    )
    assert naming == [], "name divergences through loss.divergences (DIVERGENCES, PAPER_*_DIVERGENCE)"
