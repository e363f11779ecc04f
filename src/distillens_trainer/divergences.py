"""Per-token divergences between a student's and a teacher's next-token distributions.

Every function takes logits of shape ``[..., V]`` (student first, teacher second), computes in fp32 and
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


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """fp32 log-softmax over the last dim, floored at ``LOG_PROB_FLOOR``.

    A row whose logits are all ``-inf`` would give NaN (and NaN gradients); it is replaced by a
    uniform row first, and callers zero its divergence with :func:`valid_rows`.

    Args:
        logits: ``[..., V]`` in any dtype.
    Returns:
        ``[..., V]`` fp32 log-probabilities.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    dead_row = ~valid_rows(logits)
    if dead_row.any():
        logits = torch.where(dead_row.unsqueeze(-1), torch.zeros_like(logits), logits)
    return torch.log_softmax(logits, dim=-1).clamp_min(LOG_PROB_FLOOR)


def valid_rows(logits: torch.Tensor) -> torch.Tensor:
    """``[...]`` bool: the rows of ``[..., V]`` logits that are not entirely ``-inf`` (NaN rows stay visible)."""
    return (logits != float("-inf")).any(dim=-1)


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ p·(log p − log q) over the last dim, ``[..., V] -> [...]``.

    Entries with p = 0 contribute exactly 0 (and a zero gradient), whatever ``log_q`` holds.
    """
    p = log_p.exp()
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * log_ratio).sum(dim=-1)


def forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher‖student) per position: ``[..., V], [..., V] -> [...]``."""
    return kl_from_log_probs(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))


def reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(student‖teacher) per position: ``[..., V], [..., V] -> [...]``."""
    return kl_from_log_probs(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature))


def symmetric_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Jeffreys divergence KL(t‖s) + KL(s‖t) per position: ``[..., V], [..., V] -> [...]``."""
    log_s = log_probs(student_logits, temperature)
    log_t = log_probs(teacher_logits, temperature)
    return kl_from_log_probs(log_t, log_s) + kl_from_log_probs(log_s, log_t)


def jensen_shannon(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, beta: float = 0.5
) -> torch.Tensor:
    """β·KL(t‖m) + (1−β)·KL(s‖m), m = β·t + (1−β)·s, per position: ``[..., V], [..., V] -> [...]``.

    β = 0 and β = 1 make m equal one side and the divergence 0.
    """
    log_s = log_probs(student_logits, temperature)
    log_t = log_probs(teacher_logits, temperature)
    if beta <= 0.0 or beta >= 1.0:
        return (0.0 * log_s).sum(dim=-1)  # m is one of the two sides: zero, still on the autograd graph
    # log m = logsumexp(log β + log t, log(1−β) + log s), computed without leaving log space.
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * kl_from_log_probs(log_t, log_m) + (1.0 - beta) * kl_from_log_probs(log_s, log_m)


def total_variation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """½·Σ|t − s| per position: ``[..., V], [..., V] -> [...]``."""
    s = log_probs(student_logits, temperature).exp()
    t = log_probs(teacher_logits, temperature).exp()
    return 0.5 * (t - s).abs().sum(dim=-1)


_DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "skl": symmetric_kl,
    "jsd": jensen_shannon,
    "tvd": total_variation,
}


def check_divergence_name(name: str, field: str = "divergence") -> str:
    """Return ``name`` if it is a known divergence, else raise a ``ValueError`` naming ``field``."""
    if name not in _DIVERGENCES:
        raise ValueError(
            f"{field}={name!r} is not a known divergence; choose one of {', '.join(DIVERGENCE_NAMES)}."
        )
    return name


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
        ``[...]`` fp32 divergence; rows where either side is all ``-inf`` are 0.
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
    kwargs = {"beta": beta} if name == "jsd" else {}
    per_position = _DIVERGENCES[name](student_logits, teacher_logits, temperature, **kwargs)
    both_valid = valid_rows(student_logits) & valid_rows(teacher_logits)
    return torch.where(both_valid, per_position, torch.zeros_like(per_position))
