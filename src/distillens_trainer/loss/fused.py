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

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from .compiled import CompiledOrEager
from .divergences import PAPER_KD_DIVERGENCE, check_divergence_name
from .fused_math import (
    CHUNK_BLOCKS,
    MASKED_DIVERGENCES,
    ChunkBlocks,
    add_cross_entropy_grad_,
    cross_entropy_chunk,
    cross_entropy_from_log_probs,
    divergence_chunk,
    divergence_chunk_,
    log_softmax_,
    postprocess_backward,
    softcap_derivative_,
)
from .heads import LinearHead, gathered
from .spec import AUTO_CHUNK, DEFAULT_CHUNK_SIZE, check_chunk_size, check_temperature_and_beta

# head_chunk_size="auto": as many tokens per chunk as keep the chunk math's CHUNK_BLOCKS fp32 [chunk, V] blocks
# within AUTO_CHUNK_BUDGET_BYTES, a multiple of 64 in AUTO_CHUNK_LIMITS: 512 at V = 32,000, 320 at V = 49,152, 128 at
# V = 128,256. The time per token is flat from 128 to 512 tokens at V = 49,152 (benchmarks/results/chunk_size.md).
AUTO_CHUNK_BUDGET_BYTES = 256 * 2**20
AUTO_CHUNK_LIMITS = (64, 4096)


def resolve_chunk_size(chunk_size: int | str, vocab_size: int) -> int:
    """Tokens per chunk: ``chunk_size`` itself, or for ``"auto"``
    ``clamp(64·⌊AUTO_CHUNK_BUDGET_BYTES / (CHUNK_BLOCKS · 4 · V) / 64⌋, 64, 4096)``."""
    chunk_size = check_chunk_size(chunk_size)
    if chunk_size != AUTO_CHUNK:
        return chunk_size
    low, high = AUTO_CHUNK_LIMITS
    rows = AUTO_CHUNK_BUDGET_BYTES // (CHUNK_BLOCKS * 4 * max(vocab_size, 1))
    return max(low, min(high, rows // 64 * 64))


class FusedTeacher(Protocol):
    """The teacher side of one fused job, at the job's ``N`` token positions: what the loop asks of it per chunk.

    Implementations: :class:`HeadTeacher` (head inputs and the head that makes their logits: the online teacher, a
    ``hidden`` cache) and :class:`~distillens_trainer.loss.topk.TopKDistribution` (top-k buckets: a ``topk``
    cache). The loop never asks which one it holds.

    Attributes:
        has_logits: the teacher's chunk logits can be written into the loop's reused blocks
            (:meth:`chunk_logits_`), so the chunk runs in place; otherwise the chunk runs on copies
            (:meth:`chunk_divergence` alone).
    """

    has_logits: bool

    @property
    def num_rows(self) -> int:
        """``N``, the token positions held."""
        ...

    def heads(self) -> list[LinearHead]:
        """The heads whose (ZeRO-3 partitioned) weights the loop gathers while it runs."""
        ...

    def chunk_logits_(self, rows: slice, blocks: ChunkBlocks, math_dtype: torch.dtype) -> torch.Tensor:
        """``[n, V]`` teacher logits of positions ``rows`` in the chunk's ``teacher_logits`` block (no grad)."""
        ...

    def chunk_divergence(
        self,
        name: str,
        student_logits: torch.Tensor,
        rows: slice,
        *,
        temperature: float,
        beta: float,
        need_grad: bool,
        kernel: ChunkDivergence,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Σ D, ∂Σ D/∂z ``[n, V]`` or None) of divergence ``name`` between ``student_logits`` ``[n, V]`` (left as
        they are) and the teacher at positions ``rows``; ``kernel`` computes a divergence against teacher logits."""
        ...


@dataclass(frozen=True)
class HeadTeacher:
    """A teacher side given as head inputs and its head (a :class:`FusedTeacher`): logits made chunk by chunk.

    Attributes:
        head_input: ``[N, d_t]`` teacher head inputs (no grad).
        head: the teacher's LM head and logit post-processing.
    """

    head_input: torch.Tensor
    head: LinearHead
    has_logits: ClassVar[bool] = True

    @property
    def num_rows(self) -> int:
        return int(self.head_input.shape[0])

    def heads(self) -> list[LinearHead]:
        return [self.head]

    def chunk_logits_(self, rows: slice, blocks: ChunkBlocks, math_dtype: torch.dtype) -> torch.Tensor:
        head_input = self.head_input[rows].detach()
        n = head_input.shape[0]
        out = blocks.get("teacher_logits", n, math_dtype)
        with torch.no_grad():
            self.head.logits_into(head_input, out, _raw_block(self.head, blocks, n))
        return out

    def chunk_divergence(
        self,
        name: str,
        student_logits: torch.Tensor,
        rows: slice,
        *,
        temperature: float,
        beta: float,
        need_grad: bool,
        kernel: ChunkDivergence,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            teacher_logits = self.head.logits(self.head_input[rows].detach(), student_logits.shape[-1])
        return kernel(
            name, student_logits, teacher_logits, temperature=temperature, beta=beta, need_grad=need_grad
        )


@dataclass(frozen=True)
class FusedJob:
    """One term computed against the student head: a lens layer pair, or the output KD (+ CE) term.

    Attributes:
        student_input: ``[N, d_s]`` student head input (with grad).
        teacher: the teacher side at the ``N`` positions (:class:`FusedTeacher`), or None (CE only).
        divergence: divergence name between student and teacher (ignored without a teacher).
        weight: multiplier of Σ_tokens D in the weighted total (0: computed for its value only).
        targets: ``[N]`` next-token ids for the cross-entropy, or None.
        ce_weight: multiplier of Σ_tokens CE in the weighted total.
        name: the key of this job's divergence sum among the returned sums (a term name such as ``kd_loss``);
            None: ``job{index}``.
        ce_name: the key of its cross-entropy sum (when ``targets`` are given); None: ``job{index}_ce``.
    """

    student_input: torch.Tensor
    teacher: FusedTeacher | None = None
    divergence: str = PAPER_KD_DIVERGENCE
    weight: float = 1.0
    targets: torch.Tensor | None = None
    ce_weight: float = 0.0
    name: str | None = None
    ce_name: str | None = None

    @property
    def has_teacher(self) -> bool:
        return self.teacher is not None


@dataclass(frozen=True)
class _Settings:
    vocab_size: int
    temperature: float
    beta: float
    chunk_size: int
    label_smoothing: float
    kernel: ChunkDivergence

    @property
    def compile(self) -> bool:
        return self.kernel.compile_math


# --------------------------------------------------------------------------------------------- torch.compile
class ChunkDivergence(CompiledOrEager):
    """:func:`~distillens_trainer.loss.fused_math.divergence_chunk` (a chunk's divergence against teacher logits),
    through ``torch.compile`` when ``compile_math`` (its branch-free form): compiled by the first call, eager from
    the first failure on (said once). Holds its compile state;
    :class:`~distillens_trainer.loss.objective.DistillLensObjective` keeps one for its run."""

    def __init__(self, compile_math: bool = False) -> None:
        super().__init__(
            divergence_chunk,
            "the fused divergence",
            enabled=compile_math,
            compiled_form=functools.partial(divergence_chunk, branch_free=True),
        )

    @property
    def compile_math(self) -> bool:
        return self.enabled


def _chunk_terms_on_copies(
    job: FusedJob,
    logits: torch.Tensor,
    rows: slice,
    settings: _Settings,
    kd_grad: bool,
    ce_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(Σ D, Σ CE, ∂(w·Σ D + w_ce·Σ CE)/∂z) of one chunk, each term on its own copies of ``[n, V]`` logits.

    The general form: a teacher without logits (top-k), ``torch.compile``, or a cross-entropy at a temperature ≠ 1
    (it needs the logits at T = 1 beside the divergence's). ``logits`` is left as it is.
    """
    kd_value = ce_value = grad = None
    if job.targets is not None:
        ce_value, grad = cross_entropy_chunk(
            logits, job.targets[rows], label_smoothing=settings.label_smoothing, need_grad=ce_grad
        )
        if grad is not None:
            grad.mul_(job.ce_weight)
    if job.teacher is None:
        return kd_value, ce_value, grad
    kd_value, kd_grad_chunk = job.teacher.chunk_divergence(
        job.divergence,
        logits,
        rows,
        temperature=settings.temperature,
        beta=settings.beta,
        need_grad=kd_grad,
        kernel=settings.kernel,
    )
    if kd_grad_chunk is not None:
        grad = kd_grad_chunk.mul_(job.weight) if grad is None else grad.add_(kd_grad_chunk, alpha=job.weight)
    return kd_value, ce_value, grad


def _chunk_terms_in_place(
    job: FusedJob,
    logits: torch.Tensor,
    rows: slice,
    settings: _Settings,
    blocks: ChunkBlocks,
    kd_grad: bool,
    ce_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The same as :func:`_chunk_terms_on_copies` in the chunk's reused blocks (the eager default): ``logits``
    becomes the student's log-probabilities, and the gradient comes back in one of the blocks."""
    n, math_dtype = logits.shape[0], logits.dtype
    probs = blocks.get("student_probs", n, math_dtype)
    temperature = settings.temperature if job.has_teacher else 1.0  # a CE-only job: the CE's own softmax
    live = log_softmax_(logits, probs, temperature)
    kd_value = ce_value = grad = None
    targets = job.targets[rows] if job.targets is not None else None
    if targets is not None:  # here the temperature is 1: the student's log-probs are the CE's
        ce_value = cross_entropy_from_log_probs(logits, targets, settings.label_smoothing)
    if job.teacher is not None:
        teacher_logits = job.teacher.chunk_logits_(rows, blocks, math_dtype)
        kd_value, grad = divergence_chunk_(
            job.divergence,
            logits,
            probs,
            teacher_logits,
            blocks.get("teacher_probs", n, math_dtype),
            blocks.get("mask", n, torch.bool) if job.divergence in MASKED_DIVERGENCES else None,
            temperature=settings.temperature,
            beta=settings.beta,
            need_grad=kd_grad,
            student_live=live,
        )
        if grad is not None and job.weight != 1.0:
            grad.mul_(job.weight)
    if ce_grad:
        grad = add_cross_entropy_grad_(
            grad, probs, targets, weight=job.ce_weight, label_smoothing=settings.label_smoothing
        )
    return kd_value, ce_value, grad


def _raw_block(head: LinearHead, blocks: ChunkBlocks, rows: int) -> torch.Tensor | None:
    """The head product's buffer in the weight's dtype, where that is not the math's (a bf16 head)."""
    if head.weight.dtype in (torch.float32, torch.float64):
        return None
    return blocks.get(f"raw_{head.weight.dtype}", rows, head.weight.dtype)


def _in_place(job: FusedJob, settings: _Settings) -> bool:
    """Whether a job's chunk math runs in the reused blocks (everything but the general forms above)."""
    if settings.compile or (job.teacher is not None and not job.teacher.has_logits):
        return False
    return job.targets is None or not job.has_teacher or settings.temperature == 1.0


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
    longest = max((job.student_input.shape[0] for job in jobs), default=0)
    blocks = ChunkBlocks(min(settings.chunk_size, max(longest, 1)), vocab, device)
    scale, softcap = student_head.scale, student_head.softcap
    input_grads: list[torch.Tensor | None] = []
    for index, (job, need_input_grad) in enumerate(zip(jobs, grad_inputs)):
        need_grad = need_input_grad or grad_weight or grad_bias
        kd_grad = need_grad and job.has_teacher and job.weight != 0
        ce_grad = need_grad and job.targets is not None and job.ce_weight != 0
        student_input = job.student_input.detach()
        input_grad = torch.empty_like(student_input) if need_input_grad else None
        for start in range(0, student_input.shape[0], settings.chunk_size):
            rows = slice(start, start + settings.chunk_size)
            x = student_input[rows]
            n = x.shape[0]
            logits = student_head.logits_into(
                x, blocks.get("student_logits", n, math_dtype), _raw_block(student_head, blocks, n)
            )
            softcap_derivative = None
            if softcap is not None and (kd_grad or ce_grad):
                softcap_derivative = softcap_derivative_(
                    logits, softcap, blocks.get("softcap", n, math_dtype)
                )
            if _in_place(job, settings):
                kd_value, ce_value, grad = _chunk_terms_in_place(
                    job, logits, rows, settings, blocks, kd_grad, ce_grad
                )
            else:
                kd_value, ce_value, grad = _chunk_terms_on_copies(
                    job, logits, rows, settings, kd_grad, ce_grad
                )
            if kd_value is not None:
                values[index, 0] += kd_value
                total += job.weight * kd_value
            if ce_value is not None:
                values[index, 1] += ce_value
                total += job.ce_weight * ce_value
            if grad is None:
                if input_grad is not None:
                    input_grad[rows] = 0
                continue
            grad = postprocess_backward(grad, None, scale, softcap, softcap_derivative)
            _accumulate_head_grads(grad, x, weight, blocks, input_grad, rows, weight_grad, bias_grad)
        input_grads.append(input_grad)
    return total, values, input_grads, weight_grad, bias_grad


def _accumulate_head_grads(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    blocks: ChunkBlocks,
    input_grad: torch.Tensor | None,
    rows: slice,
    weight_grad: torch.Tensor | None,
    bias_grad: torch.Tensor | None,
) -> None:
    """The chunk's two gradient products, ``grad_input[rows] = g @ W`` and ``grad_weight += gᵀ @ x`` (in the
    weight's dtype), and ``grad_bias += Σ g``: ``g`` is ``[n, V]`` ∂L/∂(head output), ``x`` ``[n, d]``."""
    if bias_grad is not None:
        bias_grad += grad.sum(dim=0, dtype=bias_grad.dtype)
    if grad.dtype != weight.dtype:
        grad = blocks.get(f"raw_{weight.dtype}", grad.shape[0], weight.dtype).copy_(grad)
    if input_grad is not None:
        if input_grad.dtype == weight.dtype:
            torch.mm(grad, weight, out=input_grad[rows])
        else:
            input_grad[rows] = grad @ weight
    if weight_grad is not None:
        x = x.to(weight.dtype)
        if weight_grad.dtype == weight.dtype:
            weight_grad.addmm_(grad.t(), x)
        else:
            weight_grad += grad.t() @ x


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


def _check(jobs: Sequence[FusedJob], chunk_size: int | str, temperature: float, beta: float) -> None:
    check_chunk_size(chunk_size, name="chunk_size", smallest=1)
    check_temperature_and_beta(temperature, beta)
    for job in jobs:
        if job.teacher is not None:
            check_divergence_name(job.divergence)
            if job.teacher.num_rows != job.student_input.shape[0]:
                raise ValueError("student and teacher head inputs must hold the same number of tokens.")


def fused_head_loss(
    student_head: LinearHead,
    jobs: Sequence[FusedJob],
    *,
    vocab_size: int,
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int | str = DEFAULT_CHUNK_SIZE,
    label_smoothing: float = 0.0,
    compile_math: bool = False,
    kernel: ChunkDivergence | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every job against one student head in a single fused pass (one shared weight-gradient accumulator).

    Returns:
        the weighted total Σ_jobs (weight·Σ D + ce_weight·Σ CE), a scalar fp32 with gradient w.r.t. every
        ``student_input`` and the head's weight and bias; and the detached fp32 sums over tokens keyed by
        name: ``job.name`` -> Σ D for a job with a teacher, ``job.ce_name`` -> Σ CE for a job with targets.
        ``compile_math`` runs the per-chunk divergence through ``torch.compile`` (falls back to eager, with
        one warning, when compilation fails); ``kernel``, a :class:`ChunkDivergence` kept across calls, replaces
        it (one compilation for a run). ``chunk_size``: tokens per chunk, or ``"auto"`` (from the vocabulary:
        :func:`resolve_chunk_size`).
    """
    _check(jobs, chunk_size, temperature, beta)
    if kernel is not None and compile_math:
        raise ValueError(
            "give fused_head_loss either compile_math or a kernel (built with compile_math), not both."
        )
    chunk_size = resolve_chunk_size(chunk_size, vocab_size)
    kernel = kernel if kernel is not None else ChunkDivergence(compile_math)
    settings = _Settings(vocab_size, temperature, beta, chunk_size, label_smoothing, kernel)
    heads = [student_head, *(head for job in jobs if job.teacher is not None for head in job.teacher.heads())]
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
