"""Closed-form per-chunk math of the fused head + divergence: values and gradients w.r.t. the logits.

Everything here works on one chunk of rows, ``[n, V]`` fp32 logits, and reproduces
``divergences.token_divergence`` (log-probabilities floored at ``LOG_PROB_FLOOR``, dead rows zero) and
``F.cross_entropy``, values AND gradients, without autograd. Notation: ``u = z / T``, ``s = softmax(u)``
(student), ``t`` (teacher), ``λ = max(log_softmax(u), floor)``.

Each divergence gives ``∂D/∂λ_s`` (its closed form is registered with it in ``divergences.DIVERGENCES``); the
floor's clamp passes it where the unfloored log-probability is above the floor, and the log-softmax backward maps
it to ``∂D/∂u = g − s·Σg``. Then ``∂D/∂z = ∂D/∂u / T``, and :func:`postprocess_backward` applies the chain rule
of the logit post-processing (scale, soft-cap).

The eager path works **in place** on four ``[n, V]`` blocks that the caller owns and reuses for every chunk
(:class:`ChunkBlocks`): the student's and the teacher's logits, which become their floored log-probabilities,
and their probabilities. Each pass over a block is one vectorised loop, no ``[n, V]`` temporary is allocated
(a fresh block per operation costs a page fault per 4 KiB on the CPU, which used to be a third of a step) and
exponentials are computed once per side. :func:`divergence_chunk` is the same math on copies (the form
``torch.compile`` fuses, and the one tests call).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .divergences import DIVERGENCES, LOG_PROB_FLOOR, divergence_record

# [n, V] blocks one chunk's math needs at the most (student / teacher log-probs and probs), besides the
# ¼-block bool mask of the MASKED_DIVERGENCES; the soft-cap's derivative and a weight-dtype copy of the gradient
# add one block and half of one where they apply.
CHUNK_BLOCKS = 4
# the divergences whose gradient does not vanish where the student's log-probability is floored: they need the
# clamp's mask (a bool [n, V] block)
MASKED_DIVERGENCES: tuple[str, ...] = tuple(name for name, record in DIVERGENCES.items() if record.masked)


def postprocess(raw_logits: torch.Tensor, scale: float | None, softcap: float | None) -> torch.Tensor:
    """``[n, V]`` head output -> fp32 (fp64 stays fp64) logits ``z = c·tanh(scale·a / c)`` (steps optional)."""
    logits = raw_logits.to(torch.promote_types(raw_logits.dtype, torch.float32))
    if scale is not None and scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def postprocess_(logits: torch.Tensor, scale: float | None, softcap: float | None) -> torch.Tensor:
    """:func:`postprocess` in place on fp32 (or fp64) ``[n, V]`` logits."""
    if scale is not None and scale != 1.0:
        logits.mul_(scale)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def softcap_derivative_(logits: torch.Tensor, softcap: float, out: torch.Tensor) -> torch.Tensor:
    """``dz/dy = 1 − (z/c)²`` of ``z = c·tanh(y/c)`` into ``out``, from the post-processed logits ``z``."""
    return torch.div(logits, softcap, out=out).square_().neg_().add_(1.0)


def postprocess_backward(
    grad_logits: torch.Tensor,
    logits: torch.Tensor | None,
    scale: float | None,
    softcap: float | None,
    softcap_derivative: torch.Tensor | None = None,
) -> torch.Tensor:
    """``∂L/∂a`` from ``∂L/∂z`` and the post-processed logits ``z`` (in place on ``grad_logits``).

    With a soft-cap, pass ``logits`` or its ``softcap_derivative`` (the in-place path has overwritten ``z``).
    """
    if softcap is not None:
        # dz/dy = 1 − (z/c)² for z = c·tanh(y/c); -inf logits have z = -c: gradient 0.
        if softcap_derivative is None:
            softcap_derivative = 1.0 - (logits / softcap).square()
        grad_logits.mul_(softcap_derivative)
    if scale is not None and scale != 1.0:
        grad_logits.mul_(scale)
    return grad_logits


@dataclass
class ChunkBlocks:
    """Reused ``[chunk, V]`` buffers, one per name and dtype, handed out as ``[n, V]`` row slices.

    One per fused pass: every chunk of every job writes into the same memory, so the math of a step allocates
    its blocks once (and the allocator never returns them to the system between chunks).
    """

    rows: int
    columns: int
    device: torch.device
    _buffers: dict[tuple[str, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def get(self, name: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
        key = (name, dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(self.rows, self.columns, device=self.device, dtype=dtype)
        return self._buffers[key][:rows]


# --------------------------------------------------------------------------------------------- in place
def shift_by_row_max_(logits: torch.Tensor, branch_free: bool = False) -> torch.Tensor:
    """In place: ``[n, V]`` logits minus each row's largest, so every row's top is 0; dead rows (all ``-inf``)
    become all 0 (uniform), as ``divergences.log_probs_and_live_rows`` does. ``branch_free`` skips the
    data-dependent test (for ``torch.compile``). Returns the ``[n, 1]`` dead rows."""
    row_max = logits.amax(dim=-1, keepdim=True)  # [n, 1]
    dead = torch.isneginf(row_max)
    if branch_free or bool(dead.any()):
        logits.masked_fill_(dead, 0.0)
        row_max.masked_fill_(dead, 0.0)
    logits.sub_(row_max)
    return dead


def log_softmax_(
    logits: torch.Tensor, probs: torch.Tensor, temperature: float, branch_free: bool = False
) -> torch.Tensor:
    """In place: ``[n, V]`` logits -> floored log-probs of ``logits / T``; ``probs`` <- their softmax.

    Dead rows (all ``-inf``) are made uniform (:func:`shift_by_row_max_`); ``branch_free`` skips the
    data-dependent test (for ``torch.compile``). Returns the ``[n]`` live rows.
    """
    if temperature != 1.0:
        logits.div_(temperature)
    dead = shift_by_row_max_(logits, branch_free)
    total = torch.exp(logits, out=probs).sum(dim=-1, keepdim=True)  # >= 1
    logits.sub_(total.log_()).clamp_min_(LOG_PROB_FLOOR)
    # exp of the floored log-probs, as the reference (not a division: same rounding)
    torch.exp(logits, out=probs)
    return ~dead.squeeze(-1)


def divergence_(
    name: str,
    log_s: torch.Tensor,
    s: torch.Tensor,
    log_t: torch.Tensor,
    t: torch.Tensor,
    *,
    beta: float,
    need_grad: bool,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row divergence ``[n]`` and ``∂D/∂λ_s`` ``[n, V]`` (None when not needed), floor clamp applied.

    Inputs are the floored log-probs and probs of both sides (:func:`log_softmax_`). ``log_s``, ``log_t`` and
    ``t`` are overwritten (the gradient is returned in one of them); ``s`` is kept. ``mask``: a bool
    ``[n, V]`` buffer for the :data:`MASKED_DIVERGENCES` (they mark the floored student entries in it).
    Each divergence's closed form is its record's ``value_and_grad_`` in :data:`~.divergences.DIVERGENCES`.
    """
    return divergence_record(name).value_and_grad_(
        log_s, s, log_t, t, beta=beta, need_grad=need_grad, mask=mask
    )


def log_softmax_backward_(grad_log_probs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``∂D/∂u = g − p·Σg`` over the last dim (in place on ``grad_log_probs``)."""
    return grad_log_probs.addcmul_(probs, grad_log_probs.sum(dim=-1, keepdim=True), value=-1.0)


def divergence_chunk_(
    name: str,
    student_logits: torch.Tensor,
    student_probs: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    temperature: float,
    beta: float,
    need_grad: bool,
    branch_free: bool = False,
    student_live: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ over rows of D(student ‖ teacher) and ``∂/∂z_s`` of that sum, in place on the four ``[n, V]`` blocks.

    Args:
        student_logits, teacher_logits: ``[n, V]`` fp32 post-processed logits (before temperature);
            overwritten (the gradient comes back in one of them or in ``teacher_probs``).
        student_probs, teacher_probs: ``[n, V]`` buffers; ``student_probs`` holds ``softmax(z_s / T)`` after.
        mask: a bool ``[n, V]`` buffer (None unless ``name`` is one of the :data:`MASKED_DIVERGENCES`).
        student_live: given when the caller has run :func:`log_softmax_` on the student side already (it read
            the cross-entropy off the log-probs): its ``[n]`` live rows; the blocks then hold λ_s and s.
    Returns:
        scalar fp32 sum and ``[n, V]`` fp32 gradient w.r.t. ``z_s`` (None unless ``need_grad``).
    """
    if student_live is None:
        student_live = log_softmax_(student_logits, student_probs, temperature, branch_free)
    teacher_live = log_softmax_(teacher_logits, teacher_probs, temperature, branch_free)
    per_row, grad = divergence_(
        name,
        student_logits,
        student_probs,
        teacher_logits,
        teacher_probs,
        beta=beta,
        need_grad=need_grad,
        mask=mask,
    )
    live = student_live & teacher_live
    all_live = False if branch_free else bool(live.all())
    if not all_live:
        per_row = torch.where(live, per_row, torch.zeros_like(per_row))
    if grad is None:
        return per_row.sum(), None
    grad = log_softmax_backward_(grad, student_probs)
    if not all_live:
        grad.mul_(live.unsqueeze(-1))
    if temperature != 1.0:
        grad.div_(temperature)
    return per_row.sum(), grad


def divergence_chunk(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    beta: float,
    need_grad: bool,
    branch_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`divergence_chunk_` on copies: the inputs are left as they are (the form ``torch.compile`` fuses).

    Args:
        student_logits, teacher_logits: ``[n, V]`` fp32 post-processed logits (before temperature).
    Returns:
        scalar fp32 sum and ``[n, V]`` fp32 gradient w.r.t. ``student_logits`` (None unless ``need_grad``).
    """
    student, teacher = student_logits.clone(), teacher_logits.detach().clone()
    return divergence_chunk_(
        name,
        student,
        torch.empty_like(student),
        teacher,
        torch.empty_like(teacher),
        torch.empty(student.shape, dtype=torch.bool, device=student.device),
        temperature=temperature,
        beta=beta,
        need_grad=need_grad,
        branch_free=branch_free,
    )


# --------------------------------------------------------------------------------------------- cross-entropy
def cross_entropy_from_log_probs(
    log_probs: torch.Tensor, targets: torch.Tensor, label_smoothing: float
) -> torch.Tensor:
    """Σ over rows of the cross-entropy ``−(1−ε)·λ[target] − ε·mean(λ)`` from floored ``[n, V]`` log-probs
    (of ``z``, at temperature 1) and ``[n]`` targets: a scalar."""
    value = -(1.0 - label_smoothing) * log_probs.gather(-1, targets.unsqueeze(-1)).sum()
    if label_smoothing > 0:
        value = value - label_smoothing * log_probs.mean(dim=-1).sum()
    return value


def add_cross_entropy_grad_(
    grad: torch.Tensor | None,
    probs: torch.Tensor,
    targets: torch.Tensor,
    *,
    weight: float,
    label_smoothing: float,
) -> torch.Tensor:
    """``grad += weight·(softmax(z) − y_ε)``, the cross-entropy's gradient w.r.t. ``z``; ``grad=None``: written
    in place on ``probs`` (``[n, V]``, the softmax at temperature 1)."""
    grad = probs.mul_(weight) if grad is None else grad.add_(probs, alpha=weight)
    if label_smoothing > 0:
        grad.sub_(weight * label_smoothing / probs.shape[-1])
    fill = grad.new_full((targets.shape[0], 1), weight * (label_smoothing - 1.0))
    return grad.scatter_add_(-1, targets.unsqueeze(-1), fill)


def cross_entropy_chunk(
    logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ over rows of ``F.cross_entropy(logits, targets, label_smoothing=ε)`` and its gradient, on copies.

    Args:
        logits: ``[n, V]`` fp32 post-processed logits (no temperature, as the reference CE).
        targets: ``[n]`` token ids in ``[0, V)``.
    Returns:
        scalar fp32 sum and ``[n, V]`` gradient ``softmax(z) − y_smooth`` (None unless ``need_grad``).
    """
    log_probs, probs = logits.clone(), torch.empty_like(logits)
    log_softmax_(log_probs, probs, 1.0)
    value = cross_entropy_from_log_probs(log_probs, targets, label_smoothing)
    if not need_grad:
        return value, None
    return value, add_cross_entropy_grad_(None, probs, targets, weight=1.0, label_smoothing=label_smoothing)
