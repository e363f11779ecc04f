"""Fused, chunked LM head + divergence: memory flat in tokens, no ``[N, V]`` tensor ever built.

For every job (a layer pair of the lens, or the output KD + CE term) the forward loops over chunks of
response tokens: the teacher's head product (no grad), the student's head product, fp32 softmax and
divergence with its closed-form gradient w.r.t. the student logits (``fused_math``), and at once the two
gradient products ``grad_input[chunk] = g @ W_s`` and ``grad_weight += gᵀ @ x``. Forward keeps only
those gradients (``[N, d]`` per input, one ``[V, d]`` fp32 accumulator shared by every job, since all
jobs read the same student head); backward only rescales them by the incoming gradient. So at most one
chunk × V block of logits is alive at a time, forward and backward, and there are exactly 4 matrix
products per chunk (2 without gradients).

Inputs are the HEAD inputs (norms and projections are applied outside, by ``LogitLens.to_head_input``,
so autograd handles them). Weights and inputs enter the matrix products in their own dtype; the softmax
and divergence arithmetic is fp32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .divergences import check_divergence_name
from .fused_math import cross_entropy_chunk, divergence_chunk, postprocess, postprocess_backward
from .heads import LinearHead
from .objective_spec import DEFAULT_CHUNK_SIZE, check_temperature_and_beta
from .topk_divergence import TopKDistribution, topk_divergence_chunk

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusedJob:
    """One term computed against the student head: a lens layer pair, or the output KD (+ CE) term.

    Attributes:
        student_input: ``[N, d_s]`` student head input (with grad).
        teacher_input: ``[N, d_t]`` teacher head input, or None (CE only, or a top-k teacher).
        teacher_head: the teacher's head, or None (CE only, or a top-k teacher).
        teacher_topk: the teacher as top-k buckets at the ``N`` positions (a ``topk`` cache) instead of
            ``teacher_input`` and ``teacher_head``; the divergence is then over k + 1 buckets.
        divergence: divergence name between student and teacher (ignored without a teacher).
        weight: multiplier of Σ_tokens D in the weighted total (0: computed for its value only).
        targets: ``[N]`` next-token ids for the cross-entropy, or None.
        ce_weight: multiplier of Σ_tokens CE in the weighted total.
        name: the key of this job's divergence sum among the returned sums (a term name such as ``kd_loss``);
            None: ``job{index}``.
        ce_name: the key of its cross-entropy sum (when ``targets`` are given); None: ``job{index}_ce``.
    """

    student_input: torch.Tensor
    teacher_input: torch.Tensor | None = None
    teacher_head: LinearHead | None = None
    divergence: str = "rkl"
    weight: float = 1.0
    targets: torch.Tensor | None = None
    ce_weight: float = 0.0
    name: str | None = None
    ce_name: str | None = None
    teacher_topk: TopKDistribution | None = None

    @property
    def has_teacher(self) -> bool:
        return (
            self.teacher_input is not None and self.teacher_head is not None
        ) or self.teacher_topk is not None

    @property
    def num_teacher_rows(self) -> int:
        if self.teacher_topk is not None:
            return int(self.teacher_topk.ids.shape[0])
        return int(self.teacher_input.shape[0])


@dataclass(frozen=True)
class _Settings:
    vocab_size: int
    temperature: float
    beta: float
    chunk_size: int
    label_smoothing: float
    compile: bool = False


# --------------------------------------------------------------------------------------------- torch.compile
_compiled_divergence_chunk: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None
_compile_failed = False


def _divergence_chunk(compile_math: bool, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`divergence_chunk`, through ``torch.compile`` when asked and it works (else eager, said once)."""
    global _compiled_divergence_chunk, _compile_failed
    if compile_math and not _compile_failed:
        try:
            if _compiled_divergence_chunk is None:
                _compiled_divergence_chunk = torch.compile(
                    functools.partial(divergence_chunk, branch_free=True), dynamic=True
                )
            return _compiled_divergence_chunk(*args, **kwargs)
        except Exception as error:
            _compile_failed = True
            logger.warning(
                "DistillLens: torch.compile of the fused divergence failed (%s: %s); using eager mode.",
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )
    return divergence_chunk(*args, **kwargs)


def _teacher_divergence_chunk(
    job: FusedJob, logits: torch.Tensor, rows: slice, vocab: int, settings: _Settings, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ D(student ‖ teacher) over the chunk's rows and its gradient w.r.t. the student's ``[n, V]`` logits."""
    if job.teacher_topk is not None:
        return topk_divergence_chunk(
            job.divergence,
            logits,
            job.teacher_topk.rows(rows),
            temperature=settings.temperature,
            beta=settings.beta,
            need_grad=need_grad,
        )
    with torch.no_grad():
        teacher_logits = job.teacher_head.logits(job.teacher_input[rows].detach(), vocab)
    return _divergence_chunk(
        settings.compile,
        job.divergence,
        logits,
        teacher_logits,
        temperature=settings.temperature,
        beta=settings.beta,
        need_grad=need_grad,
    )


# --------------------------------------------------------------------------------------------- the loop
def _run_jobs(
    student_head: LinearHead,
    jobs: Sequence[FusedJob],
    settings: _Settings,
    grad_inputs: Sequence[bool],
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None], torch.Tensor | None, torch.Tensor | None]:
    """Weighted total, per-job ``[J, 2]`` (divergence, CE) sums, and the gradients of the total.

    Returns:
        total (scalar fp32), values ``[J, 2]`` fp32, per-job ``[N, d_s]`` input gradients (None where not
        needed), ``[V, d_s]`` fp32 weight gradient and ``[V]`` fp32 bias gradient (None where not needed).
    """
    vocab = settings.vocab_size
    weight = student_head.weight[:vocab]
    device = weight.device
    math_dtype = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 for gradcheck
    total = torch.zeros((), device=device, dtype=math_dtype)
    values = torch.zeros(len(jobs), 2, device=device, dtype=math_dtype)
    weight_grad = torch.zeros(weight.shape, device=device, dtype=math_dtype) if grad_weight else None
    bias_grad = torch.zeros(vocab, device=device, dtype=math_dtype) if grad_bias else None
    input_grads: list[torch.Tensor | None] = []
    for index, (job, need_input_grad) in enumerate(zip(jobs, grad_inputs)):
        has_teacher = job.has_teacher
        need_grad = need_input_grad or grad_weight or grad_bias
        kd_grad = need_grad and has_teacher and job.weight != 0
        ce_grad = need_grad and job.targets is not None and job.ce_weight != 0
        student_input = job.student_input.detach()
        input_grad = torch.empty_like(student_input) if need_input_grad else None
        for start in range(0, student_input.shape[0], settings.chunk_size):
            rows = slice(start, start + settings.chunk_size)
            x = student_input[rows]
            raw = student_head.raw_logits(x, vocab)
            logits = postprocess(raw, student_head.scale, student_head.softcap)
            del raw
            grad: torch.Tensor | None = None
            if has_teacher:
                value, kd_grad_chunk = _teacher_divergence_chunk(job, logits, rows, vocab, settings, kd_grad)
                values[index, 0] += value
                total += job.weight * value
                if kd_grad_chunk is not None:
                    grad = kd_grad_chunk.mul_(job.weight) if job.weight != 1.0 else kd_grad_chunk
            if job.targets is not None:
                value, ce_grad_chunk = cross_entropy_chunk(
                    logits, job.targets[rows], label_smoothing=settings.label_smoothing, need_grad=ce_grad
                )
                values[index, 1] += value
                total += job.ce_weight * value
                if ce_grad_chunk is not None:
                    grad = (
                        ce_grad_chunk.mul_(job.ce_weight)
                        if grad is None
                        else grad.add_(ce_grad_chunk, alpha=job.ce_weight)
                    )
            if grad is None:
                if input_grad is not None:
                    input_grad[rows] = 0
                continue
            grad = postprocess_backward(grad, logits, student_head.scale, student_head.softcap)
            del logits
            grad = grad.to(weight.dtype)
            if input_grad is not None:
                input_grad[rows] = grad @ weight
            if weight_grad is not None:
                weight_grad += grad.t() @ x.to(weight.dtype)
            if bias_grad is not None:
                bias_grad += grad.sum(dim=0, dtype=math_dtype)
        input_grads.append(input_grad)
    return total, values, input_grads, weight_grad, bias_grad


class _FusedHeadLoss(torch.autograd.Function):
    """Autograd wrapper of :func:`_run_jobs`: forward stores the gradients, backward rescales them."""

    @staticmethod
    def forward(ctx, student_head, jobs, settings, weight, bias, *student_inputs):
        needs = ctx.needs_input_grad
        grad_weight, grad_bias = needs[3], bias is not None and needs[4]
        total, values, input_grads, weight_grad, bias_grad = _run_jobs(
            student_head, jobs, settings, needs[5:], grad_weight, grad_bias
        )
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(weight_grad, bias_grad, *input_grads)
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(ctx, grad_total, _grad_values):
        weight_grad, bias_grad, *input_grads = ctx.saved_tensors
        full_weight_grad = full_bias_grad = None  # padded rows (beyond the shared vocabulary) get zero
        if weight_grad is not None:
            full_weight_grad = weight_grad.new_zeros(ctx.weight_shape, dtype=ctx.weight_dtype)
            full_weight_grad[: weight_grad.shape[0]] = weight_grad * grad_total
        if bias_grad is not None:
            full_bias_grad = bias_grad.new_zeros(ctx.weight_shape[0], dtype=ctx.bias_dtype)
            full_bias_grad[: bias_grad.shape[0]] = bias_grad * grad_total
        input_grads = [None if g is None else g * grad_total.to(g.dtype) for g in input_grads]
        return (None, None, None, full_weight_grad, full_bias_grad, *input_grads)


@contextlib.contextmanager
def gathered(heads: Sequence[LinearHead | None]) -> Iterator[None]:
    """Gather the heads' ZeRO-3 partitioned weights for the duration (a no-op without DeepSpeed)."""
    params = [p for head in heads if head is not None for p in head.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _check(jobs: Sequence[FusedJob], chunk_size: int, temperature: float, beta: float) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
    check_temperature_and_beta(temperature, beta)
    for job in jobs:
        if job.has_teacher:
            check_divergence_name(job.divergence)
            if job.num_teacher_rows != job.student_input.shape[0]:
                raise ValueError("student and teacher head inputs must hold the same number of tokens.")


def fused_head_loss(
    student_head: LinearHead,
    jobs: Sequence[FusedJob],
    *,
    vocab_size: int,
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    label_smoothing: float = 0.0,
    compile_math: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every job against one student head in a single fused pass (one shared weight-gradient accumulator).

    Returns:
        the weighted total Σ_jobs (weight·Σ D + ce_weight·Σ CE), a scalar fp32 with gradient w.r.t. every
        ``student_input`` and the head's weight and bias; and the detached fp32 sums over tokens keyed by
        name: ``job.name`` -> Σ D for a job with a teacher, ``job.ce_name`` -> Σ CE for a job with targets.
        ``compile_math`` runs the per-chunk divergence through ``torch.compile`` (falls back to eager, with
        one warning, when compilation fails).
    """
    _check(jobs, chunk_size, temperature, beta)
    settings = _Settings(vocab_size, temperature, beta, chunk_size, label_smoothing, compile_math)
    heads = [student_head, *(job.teacher_head for job in jobs)]
    bias = student_head.bias
    tensors = [student_head.weight, bias, *(job.student_input for job in jobs)]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    with gathered(heads):
        if not needs_grad:
            with torch.no_grad():
                total, values, *_ = _run_jobs(student_head, jobs, settings, [False] * len(jobs), False, False)
        else:
            total, values = _FusedHeadLoss.apply(student_head, jobs, settings, *tensors)
    return total, _named_sums(jobs, values)


def _named_sums(jobs: Sequence[FusedJob], values: torch.Tensor) -> dict[str, torch.Tensor]:
    """``[J, 2]`` (divergence, CE) per job -> the sums each job computed, keyed by its names."""
    sums: dict[str, torch.Tensor] = {}
    for index, (job, (divergence, ce)) in enumerate(zip(jobs, values)):
        named = [(job.has_teacher, job.name or f"job{index}", divergence)]
        named.append((job.targets is not None, job.ce_name or f"job{index}_ce", ce))
        for computed, name, value in named:
            if computed:
                if name in sums:
                    raise ValueError(f"two fused jobs name a sum {name!r}: give each job its own name.")
                sums[name] = value
    return sums
