"""Per-token divergences between a student's and a teacher's next-token distributions.

Every function takes logits of shape ``[..., V]`` (student first, teacher second), computes in fp32 (in fp64
for fp64 logits, as the fused path and the top-k path do: tests compare the maths in fp64) and
returns the divergence per position, shape ``[...]``, with no reduction. All of them stay finite when
logits hold ``-inf`` (masked vocabulary entries), also when a whole row is ``-inf``; such a row
contributes zero.

Conventions (``t`` = teacher distribution, ``s`` = student distribution):

- ``fkl``: forward KL, KL(t‖s) — mean-seeking, the classic KD loss.
- ``rkl``: reverse KL, KL(s‖t) — mode-seeking, the paper's output loss.
- ``skl``: symmetric KL (Jeffreys), KL(t‖s) + KL(s‖t).
- ``jsd``: generalised Jensen-Shannon, β·KL(t‖m) + (1-β)·KL(s‖m) with m = β·t + (1-β)·s;
  β = ½ is the usual JSD (bounded by ln 2), the paper's lens loss.
- ``tvd``: total variation, ½·Σ|t − s|.

Temperature: both logit tensors are divided by ``temperature`` before the softmax, and the result is
*not* rescaled by T² (as in TRL's GKD trainer). Fold any T² factor into the loss weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# Log-probabilities are floored here so that p·(log p − log q) stays finite where q has no mass.
# exp(-1e4) underflows to exactly 0 in fp32, so floored entries carry no probability.
LOG_PROB_FLOOR = -1.0e4

DIVERGENCE_NAMES: tuple[str, ...] = ("fkl", "rkl", "skl", "jsd", "tvd")


def log_probs_and_live_rows(
    logits: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (fp64 for fp64 logits) log-softmax over the last dim, floored at ``LOG_PROB_FLOOR``, and which rows
    are live.

    A row whose logits are all ``-inf`` ("dead") would give NaN values and NaN gradients; it is found
    with one max-reduction (no ``[..., V]`` temporaries), replaced by a uniform row, and reported so
    that callers can zero its divergence.

    Args:
        logits: ``[..., V]`` in any dtype.
    Returns:
        ``[..., V]`` fp32 (fp64 stays fp64) log-probabilities and ``[...]`` bool, False for dead rows.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays
    if temperature != 1.0:
        logits = logits / temperature
    with torch.no_grad():
        dead = torch.isneginf(logits.amax(dim=-1))  # [...]
    if dead.any():  # rare: make dead rows uniform, so no NaN reaches autograd
        logits = logits.masked_fill(dead.unsqueeze(-1), 0.0)
    return torch.log_softmax(logits, dim=-1).clamp_min(LOG_PROB_FLOOR), ~dead


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[..., V]`` fp32 log-probabilities floored at ``LOG_PROB_FLOOR`` (dead rows made uniform)."""
    return log_probs_and_live_rows(logits, temperature)[0]


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ p·(log p − log q) over the last dim, ``[..., V] -> [...]``, for floored log-probs.

    Both inputs are floored at ``LOG_PROB_FLOOR``, so ``log p − log q`` is finite everywhere, and entries
    with p = 0 (``exp`` of the floor underflows to exactly 0) contribute exactly 0 with a zero gradient.
    """
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _forward_kl(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    return kl_from_log_probs(log_t, log_s)


def _reverse_kl(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    return kl_from_log_probs(log_s, log_t)


def _symmetric_kl(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    # KL(t‖s) + KL(s‖t) = Σ (t − s)(log t − log s): one pass instead of two.
    return ((log_t.exp() - log_s.exp()) * (log_t - log_s)).sum(dim=-1)


def _jensen_shannon(log_s: torch.Tensor, log_t: torch.Tensor, beta: float) -> torch.Tensor:
    if beta <= 0.0 or beta >= 1.0:
        return (0.0 * log_s).sum(dim=-1)  # m is one of the two sides: zero, still on the autograd graph
    # log m = logsumexp(log β + log t, log(1−β) + log s), computed without leaving log space.
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * kl_from_log_probs(log_t, log_m) + (1.0 - beta) * kl_from_log_probs(log_s, log_m)


def _total_variation(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(dim=-1)


# name -> divergence of floored log-probabilities (student first), ``[..., V], [..., V] -> [...]``.
_DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "fkl": _forward_kl,
    "rkl": _reverse_kl,
    "skl": _symmetric_kl,
    "jsd": _jensen_shannon,
    "tvd": _total_variation,
}


def check_divergence_name(name: str, field: str = "divergence") -> str:
    """Return ``name`` if it is a known divergence, else raise a ``ValueError`` naming ``field``."""
    if name not in _DIVERGENCES:
        raise ValueError(
            f"{field}={name!r} is not a known divergence; choose one of {', '.join(DIVERGENCE_NAMES)}."
        )
    return name


def divergence_from_log_probs(
    name: str, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, *, beta: float = 0.5
) -> torch.Tensor:
    """Divergence ``name`` between fp32 log-probabilities floored at ``LOG_PROB_FLOOR`` (see :func:`log_probs`).

    For callers that reuse one side's log-probabilities many times (the lens diagnostics). The inputs
    broadcast: ``[1, N, V]`` against ``[L, N, V]`` gives ``[L, N]``.
    """
    check_divergence_name(name)
    kwargs = {"beta": beta} if name == "jsd" else {}
    return _DIVERGENCES[name](student_log_probs, teacher_log_probs, **kwargs)


def token_divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Divergence ``name`` between student and teacher at every position, no reduction.

    Args:
        name: one of ``fkl``, ``rkl``, ``skl``, ``jsd``, ``tvd`` (see the module docstring).
        student_logits: ``[..., V]``.
        teacher_logits: ``[..., V]``, same shape; detached by the caller if it must not get gradients.
        temperature: both sides are divided by it before the softmax (no T² rescaling).
        beta: the mixture weight of ``jsd``; ignored by the others.
    Returns:
        ``[...]`` fp32 divergence (fp64 for fp64 logits); rows where either side is all ``-inf`` are 0.
    """
    check_divergence_name(name)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have the same shape; slice both to the shared vocabulary first."
        )
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must lie in [0, 1].")
    log_s, student_live = log_probs_and_live_rows(student_logits, temperature)
    log_t, teacher_live = log_probs_and_live_rows(teacher_logits, temperature)
    per_position = divergence_from_log_probs(name, log_s, log_t, beta=beta)
    live = student_live & teacher_live
    if bool(live.all()):
        return per_position
    return torch.where(live, per_position, torch.zeros_like(per_position))
