"""Divergences against a teacher kept as its top-k tokens and one tail bucket (a ``topk`` teacher cache).

The teacher's next-token distribution ``t`` is stored as the log-probabilities of its k most likely tokens
``I`` and the log of the mass left over, ``t_tail = 1 − Σ_{i∈I} t_i``. The student's distribution ``s`` is
coarsened over the same k + 1 buckets: ``s_i`` for ``i ∈ I`` and ``s_tail = Σ_{v∉I} s_v``. Every divergence
is then the ordinary one between the two (k + 1)-bucket distributions::

    D_k(s, t) = D(coarse(s), coarse(t))

For every divergence here (KL either way, Jeffreys, generalised JSD, TVD: all f-divergences) coarse-graining
can only lose information (the data-processing inequality), so ``0 ≤ D_k ≤ D``; the two are equal when the
student spreads its tail mass over ``v ∉ I`` in the teacher's proportions, and always when k = V. The
gradient reaches every student logit: the tail bucket pushes the student's total mass outside ``I`` towards
the teacher's, without saying where inside the tail it should go.

Conventions follow :mod:`~distillens_trainer.loss.divergences`: both sides divided by the temperature before the
softmax, log-probabilities floored at ``LOG_PROB_FLOOR``, rows that are all ``-inf`` (dead) contribute 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .divergences import LOG_PROB_FLOOR, divergence_from_log_probs, log_probs_and_live_rows


@dataclass(frozen=True)
class TopKDistribution:
    """A teacher's next-token distributions at ``N`` positions, kept as top-k buckets plus a tail.

    Attributes:
        ids: ``[N, k]`` int64 token ids of the teacher's k most likely tokens.
        log_probs: ``[N, k + 1]`` fp32 bucket log-probabilities, floored at ``LOG_PROB_FLOOR``; column ``k``
            is the tail (the mass outside ``ids``). Each live row sums to 1 in probability.
        live: ``[N]`` bool, False where the teacher's logits were all ``-inf`` (the row contributes 0).
    """

    ids: torch.Tensor
    log_probs: torch.Tensor
    live: torch.Tensor

    # a FusedTeacher (fused.py) with no logits: the fused loop runs its chunks on copies, through
    # chunk_divergence; a TeacherDistribution (reference.py) through divergence_sum
    has_logits: ClassVar[bool] = False

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    @property
    def num_rows(self) -> int:
        return int(self.ids.shape[0])

    def heads(self) -> list:
        """No head: the buckets are the teacher's distribution itself."""
        return []

    def chunk_logits_(self, rows: slice, blocks: object, math_dtype: torch.dtype) -> torch.Tensor:
        raise ValueError("a top-k teacher has no logits, only buckets: its fused chunks run on copies.")

    def chunk_divergence(
        self,
        name: str,
        student_logits: torch.Tensor,
        rows: slice,
        *,
        temperature: float,
        beta: float,
        need_grad: bool,
        kernel: object = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused loop's chunk step: :func:`topk_divergence_chunk` at positions ``rows`` (``kernel``, for
        teacher logits, is not used)."""
        return topk_divergence_chunk(
            name, student_logits, self.rows(rows), temperature=temperature, beta=beta, need_grad=need_grad
        )

    def divergence_sum(
        self, name: str, student_logits: torch.Tensor, *, temperature: float, beta: float
    ) -> torch.Tensor:
        """Σ over the ``N`` rows of :func:`topk_divergence` against ``student_logits`` ``[N, V]`` (the reference)."""
        return topk_divergence(name, student_logits, self, temperature=temperature, beta=beta).sum()

    def rows(self, rows: slice) -> TopKDistribution:
        """The distributions of positions ``rows``."""
        return TopKDistribution(self.ids[rows], self.log_probs[rows], self.live[rows])

    def to(self, device: torch.device | str) -> TopKDistribution:
        return TopKDistribution(self.ids.to(device), self.log_probs.to(device), self.live.to(device))

    @classmethod
    def from_stored(cls, ids: torch.Tensor, log_probs: torch.Tensor) -> TopKDistribution:
        """Buckets read back from storage (any float dtype; dead rows all ``-inf``), renormalised in fp32 so
        that rounding in the stored dtype still leaves a distribution."""
        log_probs = log_probs.float()
        total = torch.logsumexp(log_probs, dim=-1, keepdim=True)  # ~0 for live rows, -inf for dead ones
        live = torch.isfinite(total).squeeze(-1)
        uniform = torch.full_like(log_probs, -float(torch.log(torch.tensor(float(log_probs.shape[-1])))))
        normalised = torch.where(live.unsqueeze(-1), log_probs - total, uniform).clamp_min(LOG_PROB_FLOOR)
        return cls(ids.long(), normalised, live)


def topk_of_logits(logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopKDistribution:
    """The teacher side: ``[n, V]`` logits -> their top-k buckets and tail at ``temperature`` (no grad).

    A dead row (all ``-inf``) is kept with ``live=False`` and, in :func:`stored_log_probs`, all ``-inf``.
    """
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"top_k={k} must lie in 1..{logits.shape[-1]} (the shared vocabulary).")
    with torch.no_grad():
        log_p, live = log_probs_and_live_rows(logits, temperature)  # [n, V] floored, [n]
        top, ids = log_p.topk(k, dim=-1)  # [n, k]
        tail = _logsumexp_or_neg_inf(log_p.scatter(-1, ids, -float("inf")))  # [n]; -inf when k = V
        log_probs = torch.cat([top, tail.unsqueeze(-1)], dim=-1).clamp_min(LOG_PROB_FLOOR)
    return TopKDistribution(ids, log_probs, live)


def stored_log_probs(teacher: TopKDistribution) -> torch.Tensor:
    """``[N, k + 1]`` bucket log-probabilities as written to a cache: dead rows all ``-inf``."""
    return teacher.log_probs.masked_fill(~teacher.live.unsqueeze(-1), -float("inf"))


def _logsumexp_or_neg_inf(values: torch.Tensor) -> torch.Tensor:
    """``[n, V] -> [n]`` log Σ exp over the last dim; ``-inf`` for a row with no mass, with finite (zero)
    gradients there too (``torch.logsumexp`` gives NaN gradients on an all ``-inf`` row)."""
    top = values.detach().amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    mass = (values - top).exp().sum(dim=-1)  # [n]
    log_mass = mass.clamp_min(torch.finfo(mass.dtype).tiny).log() + top.squeeze(-1)
    return torch.where(mass > 0, log_mass, torch.full_like(log_mass, -float("inf")))


def student_bucket_log_probs(
    student_logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student side, differentiable: ``[n, V]`` logits and the teacher's ``[n, k]`` ids -> ``[n, k + 1]``
    floored bucket log-probabilities (the k tokens, then the tail) and ``[n]`` live rows.

    A dead student row (all ``-inf``) is made uniform, as :func:`~divergences.log_probs_and_live_rows` does.
    """
    logits = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))  # fp32 (fp64 stays)
    if temperature != 1.0:
        logits = logits / temperature
    with torch.no_grad():
        dead = torch.isneginf(logits.amax(dim=-1))  # [n]
    if bool(dead.any()):
        logits = logits.masked_fill(dead.unsqueeze(-1), 0.0)
    normaliser = _logsumexp_or_neg_inf(logits)  # [n]
    top = logits.gather(-1, ids)  # [n, k]
    tail = _logsumexp_or_neg_inf(logits.scatter(-1, ids, -float("inf")))  # [n]
    buckets = torch.cat([top, tail.unsqueeze(-1)], dim=-1) - normaliser.unsqueeze(-1)
    return buckets.clamp_min(LOG_PROB_FLOOR), ~dead


def topk_divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher: TopKDistribution,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """``[n]`` fp32 (fp64 for fp64 logits) divergence ``name`` (student first) between the student's and the teacher's k + 1 buckets,
    differentiable w.r.t. ``student_logits`` ``[n, V]``; rows dead on either side are 0."""
    log_s, student_live = student_bucket_log_probs(student_logits, teacher.ids, temperature)
    per_row = divergence_from_log_probs(name, log_s, teacher.log_probs.to(log_s.device), beta=beta)
    live = student_live & teacher.live.to(per_row.device)
    return torch.where(live, per_row, torch.zeros_like(per_row))


def topk_divergence_chunk(
    name: str,
    student_logits: torch.Tensor,
    teacher: TopKDistribution,
    *,
    temperature: float,
    beta: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ over the rows of :func:`topk_divergence` and its gradient ``[n, V]`` w.r.t. ``student_logits`` (None
    unless ``need_grad``): the fused path's per-chunk step for a ``topk`` teacher."""
    if not need_grad:
        with torch.no_grad():
            return topk_divergence(
                name, student_logits, teacher, temperature=temperature, beta=beta
            ).sum(), None
    logits = student_logits.detach().requires_grad_(True)
    with torch.enable_grad():
        value = topk_divergence(name, logits, teacher, temperature=temperature, beta=beta).sum()
        (grad,) = torch.autograd.grad(value, logits)
    return value.detach(), grad
