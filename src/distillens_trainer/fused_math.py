"""Closed-form per-chunk math of the fused head + divergence: values and gradients w.r.t. the logits.

Everything here works on one chunk of rows, ``[n, V]`` fp32 logits, and reproduces
``divergences.token_divergence`` (log-probabilities floored at ``LOG_PROB_FLOOR``, dead rows zero) and
``F.cross_entropy`` exactly, values AND gradients, without autograd. Notation: ``u = z / T``,
``s = softmax(u)`` (student), ``t`` (teacher), ``λ = max(log_softmax(u), floor)``.

Each divergence gives ``∂D/∂λ_s`` (the gradient w.r.t. the floored student log-probabilities); the
clamp passes it where the unfloored log-probability is >= the floor, and the log-softmax backward maps
it to ``∂D/∂u = g − s·Σg``. Then ``∂D/∂z = ∂D/∂u / T``, and :func:`postprocess_backward` applies the
chain rule of the logit post-processing (scale, soft-cap).
"""

from __future__ import annotations

import math

import torch

from .divergences import LOG_PROB_FLOOR


def postprocess(raw_logits: torch.Tensor, scale: float | None, softcap: float | None) -> torch.Tensor:
    """``[n, V]`` head output -> fp32 (fp64 stays fp64) logits ``z = c·tanh(scale·a / c)`` (steps optional)."""
    logits = raw_logits.to(torch.promote_types(raw_logits.dtype, torch.float32))
    if scale is not None and scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def postprocess_backward(
    grad_logits: torch.Tensor, logits: torch.Tensor, scale: float | None, softcap: float | None
) -> torch.Tensor:
    """``∂L/∂a`` from ``∂L/∂z`` and the post-processed logits ``z`` (in place on ``grad_logits``)."""
    if softcap is not None:
        # dz/dy = 1 − (z/c)² for z = c·tanh(y/c); -inf logits have z = -c: gradient 0.
        grad_logits.mul_(1.0 - (logits / softcap).square())
    if scale is not None and scale != 1.0:
        grad_logits.mul_(scale)
    return grad_logits


def floored_log_probs(
    logits: torch.Tensor, temperature: float, branch_free: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``[n, V]`` logits -> floored log-probs ``[n, V]``, clamp mask ``[n, V]`` (True: not floored), live rows ``[n]``.

    Dead rows (all ``-inf``) are made uniform, as ``divergences.log_probs_and_live_rows`` does.
    ``branch_free`` skips the data-dependent test (for ``torch.compile``).
    """
    if temperature != 1.0:
        logits = logits / temperature
    dead = torch.isneginf(logits.amax(dim=-1))
    if branch_free or bool(dead.any()):
        logits = logits.masked_fill(dead.unsqueeze(-1), 0.0)
    log_p = torch.log_softmax(logits, dim=-1)
    passes = log_p >= LOG_PROB_FLOOR
    return log_p.clamp_min_(LOG_PROB_FLOOR), passes, ~dead


def divergence_and_log_prob_grad(
    name: str, log_s: torch.Tensor, log_t: torch.Tensor, s: torch.Tensor, beta: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row divergence ``[n]`` and ``∂D/∂λ_s`` ``[n, V]`` (None when not needed) from floored log-probs.

    ``s = exp(log_s)`` is passed in (the caller needs it again for the log-softmax backward).

    ``fkl`` KL(t‖s): −t.  ``rkl`` KL(s‖t): s·(λ_s − λ_t + 1).  ``skl``: s·(1 + λ_s − λ_t) − t.
    ``jsd_β`` (m = βt + (1−β)s): (1−β)·s·(λ_s − λ_m).  ``tvd``: ½·sign(s − t)·s.
    """
    if name == "rkl":
        diff = log_s - log_t
        value = (s * diff).sum(dim=-1)
        return value, (diff.add_(1.0).mul_(s) if need_grad else None)
    if name == "fkl":
        t = log_t.exp()
        value = (t * (log_t - log_s)).sum(dim=-1)
        return value, (t.neg_() if need_grad else None)
    if name == "skl":
        t = log_t.exp()
        diff = log_s - log_t
        value = ((s - t) * diff).sum(dim=-1)
        return value, (diff.add_(1.0).mul_(s).sub_(t) if need_grad else None)
    if name == "jsd":
        if beta <= 0.0 or beta >= 1.0:
            zeros = log_s.new_zeros(log_s.shape[:-1])
            return zeros, (torch.zeros_like(log_s) if need_grad else None)
        t = log_t.exp()
        log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
        value = beta * (t * (log_t - log_m)).sum(dim=-1)
        student_side = s * (log_s - log_m)
        value = value + (1.0 - beta) * student_side.sum(dim=-1)
        return value, (student_side.mul_(1.0 - beta) if need_grad else None)
    if name == "tvd":
        t = log_t.exp()
        diff = s - t
        value = 0.5 * diff.abs().sum(dim=-1)
        return value, (diff.sign_().mul_(s).mul_(0.5) if need_grad else None)
    raise ValueError(f"divergence={name!r} is not a known divergence.")


def log_softmax_backward(grad_log_probs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``∂D/∂u = g − p·Σg`` over the last dim (in place on ``grad_log_probs``)."""
    return grad_log_probs.sub_(probs * grad_log_probs.sum(dim=-1, keepdim=True))


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
    """Σ over rows of D(student ‖ teacher) and ``∂/∂z_s`` of that sum.

    Args:
        student_logits, teacher_logits: ``[n, V]`` fp32 post-processed logits (before temperature).
        branch_free: no data-dependent Python branches (dead-row handling always on), for ``torch.compile``.
    Returns:
        scalar fp32 sum and ``[n, V]`` fp32 gradient w.r.t. ``student_logits`` (None unless ``need_grad``).
    """
    log_s, passes, student_live = floored_log_probs(student_logits, temperature, branch_free)
    with torch.no_grad():
        log_t, _, teacher_live = floored_log_probs(teacher_logits, temperature, branch_free)
    live = student_live & teacher_live
    student_probs = log_s.exp()
    per_row, grad = divergence_and_log_prob_grad(name, log_s, log_t, student_probs, beta, need_grad)
    all_live = False if branch_free else bool(live.all())
    if not all_live:
        per_row = torch.where(live, per_row, torch.zeros_like(per_row))
    if grad is None:
        return per_row.sum(), None
    if name in ("fkl", "skl"):  # the −t term is not multiplied by s: apply the floor's clamp mask
        grad = grad.mul_(passes)
    grad = log_softmax_backward(grad, student_probs)
    if not all_live:
        grad = grad.mul_(live.unsqueeze(-1))
    if temperature != 1.0:
        grad = grad.div_(temperature)
    return per_row.sum(), grad


def cross_entropy_chunk(
    logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ over rows of ``F.cross_entropy(logits, targets, label_smoothing=ε)`` and its gradient.

    Args:
        logits: ``[n, V]`` fp32 post-processed logits (no temperature, as the reference CE).
        targets: ``[n]`` token ids in ``[0, V)``.
    Returns:
        scalar fp32 sum and ``[n, V]`` gradient ``softmax(z) − y_smooth`` (None unless ``need_grad``).
    """
    log_p = torch.log_softmax(logits, dim=-1)
    target_log_p = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    value = -(1.0 - label_smoothing) * target_log_p.sum()
    if label_smoothing > 0:
        value = value - label_smoothing * log_p.mean(dim=-1).sum()
    if not need_grad:
        return value, None
    grad = log_p.exp_()
    if label_smoothing > 0:
        grad.sub_(label_smoothing / logits.shape[-1])
    grad.scatter_add_(-1, targets.unsqueeze(-1), grad.new_full((targets.shape[0], 1), label_smoothing - 1.0))
    return value, grad
