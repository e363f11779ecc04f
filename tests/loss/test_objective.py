"""DistillLensObjective against a naive research-code reference: all K lens layers stacked as ``[K, B, T, V]``,
divergences at every position from textbook float64 formulas, the response mask applied last.

The reference lives here (not in benchmarks/) so that the suite never imports a benchmark. It checks the
objective both ways it computes: straightforward (``chunk_size=0``) and fused (chunked heads), on losses
and on the student's gradients, with padding, batches of samples whose responses differ, and the
normalisation over a gradient-accumulation window (``num_items_in_batch``).

These are tests of the maths: the models are float64, and every comparison allows the rounding of a float64 sum
(``conftest.assert_close_to_reference``), so they hold on any CPU and thread count.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distillens_trainer.loss.forwards import ForwardRequest
from distillens_trainer.loss.lens import LogitLens
from distillens_trainer.loss.objective import DistillLensObjective
from distillens_trainer.loss.spec import DEFAULT_CHUNK_SIZE, ObjectiveSpec, lens_term_name
from distillens_trainer.loss.teacher_signals import ModelTeacher

from conftest import TINY_VOCAB, assert_close_to_reference, pad_batch, tiny_llama, token_rows

TEACHER_VOCAB = TINY_VOCAB + 8  # padded differently: only the shared TINY_VOCAB columns are compared
CHUNK_SIZES = (0, 5, DEFAULT_CHUNK_SIZE)  # straightforward, fused in several chunks, the fused default
# (student, teacher) hidden_states indices; the last pair reads both already-normed final states.
LAYER_MAP = [(1, 1), (2, 3), (3, 4)]
SPEC = ObjectiveSpec(
    ce_weight=0.5, kd_weight=1.0, kd_divergence="rkl", lens_weight=2.0, lens_divergence="jsd"
)


def textbook_divergence(
    name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    """``[..., V], [..., V] -> [...]`` in float64, straight from the definitions."""
    log_s = torch.log_softmax(student_logits.double(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.double(), dim=-1)
    s, t = log_s.exp(), log_t.exp()
    if name == "rkl":
        return (s * (log_s - log_t)).sum(-1)
    if name == "fkl":
        return (t * (log_t - log_s)).sum(-1)
    if name == "jsd":
        log_m = (0.5 * s + 0.5 * t).log()
        return 0.5 * (t * (log_t - log_m)).sum(-1) + 0.5 * (s * (log_s - log_m)).sum(-1)
    raise ValueError(name)


def naive_term_sums(
    spec, student_out, teacher_out, labels, student_lens, teacher_lens, layer_map, vocab_size
):
    """Unnormalised term sums the research-code way: ``[K, B, T-1, V]`` stacks, mask ``[B, T-1]`` broadcast
    over K (never tiled), every divergence computed at every position and masked afterwards."""
    targets = labels[:, 1:]  # [B, T-1]
    mask = (targets != -100).double()
    student_logits = student_out.logits[:, :-1, :vocab_size]
    teacher_logits = teacher_out.logits[:, :-1, :vocab_size].detach()
    ce = F.cross_entropy(student_logits.double().flatten(0, 1), targets.flatten(), reduction="sum")
    kd = (textbook_divergence(spec.kd_divergence, student_logits, teacher_logits) * mask).sum()
    student_stack = torch.stack(
        [student_lens(student_out.hidden_states[s], s)[:, :-1, :vocab_size] for s, _ in layer_map]
    )  # [K, B, T-1, V]
    with torch.no_grad():
        teacher_stack = torch.stack(
            [teacher_lens(teacher_out.hidden_states[t], t)[:, :-1, :vocab_size] for _, t in layer_map]
        )
    per_pair = (textbook_divergence(spec.lens_divergence, student_stack, teacher_stack) * mask).sum(
        dim=(1, 2)
    )
    return {"ce_loss": ce, "kd_loss": kd, "lens_loss": per_pair.mean(), "pairs": per_pair}


def naive_loss(spec, sums, denominator):
    weighted = spec.ce_weight * sums["ce_loss"] + spec.kd_weight * sums["kd_loss"]
    return (weighted + spec.lens_weight * sums["lens_loss"]) / denominator


@pytest.fixture(scope="module")
def models():
    student = tiny_llama(num_layers=3, hidden=32, seed=1).double()
    teacher = tiny_llama(num_layers=4, hidden=48, vocab=TEACHER_VOCAB, seed=2).double().requires_grad_(False)
    return student, teacher


def _forward(model, batch):
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    return model(**inputs, output_hidden_states=True, use_cache=False)


def _objective(student, teacher, chunk_size, spec=SPEC):
    student_lens, teacher_lens = LogitLens(student), LogitLens(teacher)
    objective = DistillLensObjective(
        spec,
        vocab_size=TINY_VOCAB,
        student=student,
        teacher=ModelTeacher(teacher, teacher_lens),
        student_lens=student_lens,
        layer_map=LAYER_MAP,
        chunk_size=chunk_size,
    )
    return objective


def _run_objective(objective, student, teacher, batch, num_items=None, fused_output=False):
    """(output, student gradients) of the objective on ``batch``."""
    student.zero_grad(set_to_none=True)
    student_out = _forward(student, batch)
    with torch.no_grad():
        teacher_out = _forward(teacher, batch)
    result = objective(
        batch["labels"],
        student_out,
        objective.teacher.outputs_signals(teacher_out, batch["labels"]),
        request=ForwardRequest(both_hidden_states=True, fused_output=fused_output),
        num_items_in_batch=num_items,
    )
    result.loss.backward()
    return result, [p.grad.clone() for p in student.parameters()]


def _run_naive(objective, student, teacher, batch, denominator):
    student.zero_grad(set_to_none=True)
    student_out = _forward(student, batch)
    with torch.no_grad():
        teacher_out = _forward(teacher, batch)
    sums = naive_term_sums(
        objective.spec, student_out, teacher_out, batch["labels"], objective.student_lens,
        objective.teacher.lens, objective.layer_map, objective.vocab_size,
    )  # fmt: skip
    loss = naive_loss(objective.spec, sums, denominator)
    loss.backward()
    return loss, sums, [p.grad.clone() for p in student.parameters()]


def _assert_grads_close(actual, expected):
    for got, want in zip(actual, expected, strict=True):
        assert_close_to_reference(got, want)


def _response_tokens(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


# (chunk_size, fused_output): the output term is fused (read from the last hidden states) only when chunking.
PATHS = [(0, False)] + [(chunk_size, fused) for chunk_size in CHUNK_SIZES[1:] for fused in (False, True)]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("chunk_size, fused_output", PATHS)
def test_loss_terms_and_gradients_match_the_naive_stacked_reference(
    models, chunk_size, fused_output, padding_side
):
    student, teacher = models
    batch = pad_batch(token_rows(4, seed=3), padding_side=padding_side, pad_to=18)
    objective = _objective(student, teacher, chunk_size)
    result, grads = _run_objective(objective, student, teacher, batch, fused_output=fused_output)
    expected_loss, sums, expected_grads = _run_naive(
        objective, student, teacher, batch, _response_tokens(batch)
    )

    assert result.num_tokens == _response_tokens(batch)
    assert result.loss.dtype == torch.float64  # the maths, not fp32 rounding, is compared
    assert_close_to_reference(result.loss, expected_loss)
    for name in ("ce_loss", "kd_loss", "lens_loss"):
        assert_close_to_reference(result.term_sums[name], sums[name], msg=name)
    for (s, t), pair_sum in zip(objective.layer_map, sums["pairs"]):
        assert_close_to_reference(result.term_sums[lens_term_name(s, t)], pair_sum)
    _assert_grads_close(grads, expected_grads)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_each_sample_counts_on_its_own_responses_when_responses_differ(models, chunk_size):
    """B > 1 with a different prompt/response split per sample: the batch loss is the sum of the per-sample
    losses under the same denominator. A mask tiled across the K lens layers in the wrong order (the
    paper's code's bug) pairs sample b's layers with sample b'’s mask and breaks this equality."""
    student, teacher = models
    rows = token_rows(4, seed=5)
    responses = [sum(label != -100 for label in row["labels"][1:]) for row in rows]
    assert len(set(responses)) > 1, "the samples must differ in response length"
    batch = pad_batch(rows, pad_to=16)
    objective = _objective(student, teacher, chunk_size)
    total = _response_tokens(batch)
    batch_result, batch_grads = _run_objective(objective, student, teacher, batch, num_items=total)

    sample_loss = torch.zeros((), dtype=torch.float64)
    sample_grads = None
    for row in rows:
        result, grads = _run_objective(
            objective, student, teacher, pad_batch([row], pad_to=16), num_items=total
        )
        sample_loss = sample_loss + result.loss.double()
        sample_grads = grads if sample_grads is None else [a + b for a, b in zip(sample_grads, grads)]
    assert_close_to_reference(batch_result.loss, sample_loss)
    _assert_grads_close(batch_grads, sample_grads)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_accumulated_micro_batches_equal_one_batch_over_the_window_token_count(models, chunk_size):
    """Two micro-batches, each divided by the window's token count (``num_items_in_batch``), add up to the
    naive loss and gradients of the whole window; dividing each by its own count would not."""
    student, teacher = models
    rows = token_rows(6, seed=7)
    first, second = pad_batch(rows[:2], pad_to=16), pad_batch(rows[2:], pad_to=16)
    window_tokens = _response_tokens(first) + _response_tokens(second)
    assert _response_tokens(first) != _response_tokens(second)
    objective = _objective(student, teacher, chunk_size)

    losses, grads = [], []
    for micro_batch in (first, second):
        result, micro_grads = _run_objective(
            objective, student, teacher, micro_batch, num_items=window_tokens
        )
        assert result.denominator == window_tokens
        losses.append(result.loss.double())
        grads.append(micro_grads)
    whole = pad_batch(rows, pad_to=16)
    expected_loss, _, expected_grads = _run_naive(objective, student, teacher, whole, window_tokens)

    assert_close_to_reference(losses[0] + losses[1], expected_loss)
    _assert_grads_close([a + b for a, b in zip(*grads)], expected_grads)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_extra_padding_changes_neither_loss_nor_gradients(models, chunk_size):
    student, teacher = models
    rows = token_rows(3, seed=9)
    objective = _objective(student, teacher, chunk_size)
    tight, tight_grads = _run_objective(objective, student, teacher, pad_batch(rows))
    padded, padded_grads = _run_objective(objective, student, teacher, pad_batch(rows, pad_to=24))
    assert_close_to_reference(padded.loss, tight.loss)
    _assert_grads_close(padded_grads, tight_grads)
