"""Per-token divergences between a student's and a teacher's next-token distributions: the registry.

:data:`DIVERGENCES` holds one :class:`Divergence` record per divergence, the one place each is named and described:
its name, its short description (the configuration's help, the model card and the table in ``docs/objective.md``
read it from here), its label and unit (the lens figures), its value on log-probabilities (autograd: the
straightforward and top-k paths, the reference of the tests), its value with the closed-form gradient computed in
place (the fused path, :func:`~distillens_trainer.loss.fused_math.divergence_`) and its value for many layer pairs
at once from per-layer statistics (the lens profile, :class:`LayerPairs`). :data:`DIVERGENCE_NAMES` (the config's
and the command line's choices) is derived from it.

Every divergence takes logits of shape ``[..., V]`` (student first, teacher second), computes in fp32 (in fp64 for
fp64 logits, as the fused path and the top-k path do: tests compare the maths in fp64) and returns the divergence
per position, shape ``[...]``, with no reduction. All of them stay finite when logits hold ``-inf`` (masked
vocabulary entries), also when a whole row is ``-inf``; such a row contributes zero.

Temperature: both logit tensors are divided by ``temperature`` before the softmax, and the result is *not*
rescaled by T² (as in TRL's GKD trainer). Fold any T² factor into the loss weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

# Log-probabilities are floored here so that p·(log p − log q) stays finite where q has no mass.
# exp(-1e4) underflows to exactly 0 in fp32, so floored entries carry no probability.
LOG_PROB_FLOOR = -1.0e4

# The paper's choices (arXiv 2602.13567), the defaults of the objective: reverse KL on the final logits, the JSD
# through the logit lens.
PAPER_KD_DIVERGENCE = "rkl"
PAPER_LENS_DIVERGENCE = "jsd"


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


# ------------------------------------------------------------------------------ values on log-probabilities
# Each: floored log-probabilities (student first) ``[..., V], [..., V] -> [...]``, under autograd; ``beta`` is
# read by the JSD only.
def _forward_kl(log_s: torch.Tensor, log_t: torch.Tensor, *, beta: float) -> torch.Tensor:
    return kl_from_log_probs(log_t, log_s)


def _reverse_kl(log_s: torch.Tensor, log_t: torch.Tensor, *, beta: float) -> torch.Tensor:
    return kl_from_log_probs(log_s, log_t)


def _symmetric_kl(log_s: torch.Tensor, log_t: torch.Tensor, *, beta: float) -> torch.Tensor:
    # KL(t‖s) + KL(s‖t) = Σ (t − s)(log t − log s): one pass instead of two.
    return ((log_t.exp() - log_s.exp()) * (log_t - log_s)).sum(dim=-1)


def _jensen_shannon(log_s: torch.Tensor, log_t: torch.Tensor, *, beta: float) -> torch.Tensor:
    if beta <= 0.0 or beta >= 1.0:
        return (0.0 * log_s).sum(dim=-1)  # m is one of the two sides: zero, still on the autograd graph
    # log m = logsumexp(log β + log t, log(1−β) + log s), computed without leaving log space.
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * kl_from_log_probs(log_t, log_m) + (1.0 - beta) * kl_from_log_probs(log_s, log_m)


def _total_variation(log_s: torch.Tensor, log_t: torch.Tensor, *, beta: float) -> torch.Tensor:
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(dim=-1)


# ------------------------------------------------------------------------------ values and gradients, in place
# Each: ``(λ_s, s, λ_t, t, *, beta, need_grad, mask) -> (per-row value [n], ∂D/∂λ_s [n, V] or None)`` on the
# floored log-probs λ and probs of both sides (``[n, V]``, ``fused_math.log_softmax_``), with the floor's clamp
# applied to the gradient. ``λ_s``, ``λ_t`` and ``t`` may be overwritten (the gradient comes back in one of them);
# ``s`` is kept. ``mask``: a bool ``[n, V]`` buffer for a ``masked`` divergence (it marks the floored student
# entries in it), None for the others.
def _forward_kl_(
    log_s: Tensor, s: Tensor, log_t: Tensor, t: Tensor, *, beta: float, need_grad: bool, mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """KL(t‖s): ∂/∂λ_s = −t."""
    floored = torch.le(log_s, LOG_PROB_FLOOR, out=mask)  # the clamp passes no gradient there
    diff = log_t.sub_(log_s)  # λ_t − λ_s
    per_row = torch.mul(t, diff, out=log_s).sum(dim=-1)
    return per_row, (t.neg_().masked_fill_(floored, 0.0) if need_grad else None)


def _reverse_kl_(
    log_s: Tensor, s: Tensor, log_t: Tensor, t: Tensor, *, beta: float, need_grad: bool, mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """KL(s‖t): ∂/∂λ_s = s·(λ_s − λ_t + 1)."""
    diff = log_t.sub_(log_s).neg_()  # λ_s − λ_t
    per_row = torch.mul(s, diff, out=t).sum(dim=-1)
    return per_row, (diff.add_(1.0).mul_(s) if need_grad else None)


def _symmetric_kl_(
    log_s: Tensor, s: Tensor, log_t: Tensor, t: Tensor, *, beta: float, need_grad: bool, mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """KL(t‖s) + KL(s‖t): ∂/∂λ_s = s·(1 + λ_s − λ_t) − t."""
    floored = torch.le(log_s, LOG_PROB_FLOOR, out=mask)  # the clamp passes no gradient there
    diff = log_t.sub_(log_s)  # λ_t − λ_s
    t_minus_s = t.sub_(s)
    per_row = torch.mul(t_minus_s, diff, out=log_s).sum(dim=-1)
    # s·(1 + λ_s − λ_t) − t = −(s·(λ_t − λ_s) + (t − s))
    return per_row, (diff.mul_(s).add_(t_minus_s).neg_().masked_fill_(floored, 0.0) if need_grad else None)


def _jensen_shannon_(
    log_s: Tensor, s: Tensor, log_t: Tensor, t: Tensor, *, beta: float, need_grad: bool, mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """β·KL(t‖m) + (1−β)·KL(s‖m), m = βt + (1−β)s: ∂/∂λ_s = (1−β)·s·(λ_s − λ_m)."""
    if beta <= 0.0 or beta >= 1.0:
        return log_s.new_zeros(log_s.shape[:-1]), (log_s.zero_() if need_grad else None)
    teacher_entropy_term = log_t.mul_(t).sum(dim=-1)  # Σ t·λ_t
    log_m = torch.mul(t, beta, out=log_t).add_(s, alpha=1.0 - beta).log_().clamp_min_(LOG_PROB_FLOOR)
    per_row = beta * (teacher_entropy_term - t.mul_(log_m).sum(dim=-1))
    student_side = log_s.sub_(log_m).mul_(s)  # s·(λ_s − λ_m)
    per_row = per_row + (1.0 - beta) * student_side.sum(dim=-1)
    return per_row, (student_side.mul_(1.0 - beta) if need_grad else None)


def _total_variation_(
    log_s: Tensor, s: Tensor, log_t: Tensor, t: Tensor, *, beta: float, need_grad: bool, mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """½·Σ|t − s|: ∂/∂λ_s = ½·sign(s − t)·s."""
    s_minus_t = t.sub_(s).neg_()
    sign = torch.sign(s_minus_t, out=log_s)
    per_row = 0.5 * s_minus_t.mul_(sign).sum(dim=-1)
    return per_row, (sign.mul_(s).mul_(0.5) if need_grad else None)


# ------------------------------------------------------------------------------ per layer pair, from layer statistics
class LayerStatistics(Protocol):
    """One model's layers on one chunk of ``c`` tokens, ``n`` layers read (the lens profile's ``ChunkLayers``):
    fp32 floored log-probabilities λ and probabilities p, ``[n, c, V]``; their per-token ``Σ p·λ`` (``negentropy``)
    and ``Σ p`` (``mass``), ``[n, c]`` each. ``log_probs`` may hold only the last layer (``[1, c, V]``) where no
    requested divergence has ``per_pair_reads_log_probs``."""

    log_probs: Tensor
    probs: Tensor
    negentropy: Tensor
    mass: Tensor


@dataclass
class LayerPairs:
    """The ``P`` layer pairs ``(student_rows[k], teacher_rows[k])`` of one chunk, what each divergence's
    ``per_pair`` reads: both sides' :class:`LayerStatistics`, a ``[2, c, V]`` fp32 ``work`` block (overwritten),
    and the cross terms ``Σ t·λ_s`` and ``Σ s·λ_t`` once computed (fkl, rkl and skl share them).

    Every term is one row dot per pair (or the JSD's mixture in ``work``), so a pair's value does not depend on
    which other layers are read. ``mixture_sums``: a replacement for :func:`mixture_entropy_sums` (the JSD's one
    pass over the vocabulary per pair), e.g. it compiled; None walks the tokens eagerly in ``work``.
    """

    student: LayerStatistics
    teacher: LayerStatistics
    student_rows: Sequence[int]
    teacher_rows: Sequence[int]
    work: Tensor
    mixture_sums: Callable[[Tensor, Tensor, float], Tensor] | None = None
    _cross_terms: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)

    def teacher_probs_dot_student_log_probs(self) -> Tensor:
        """``[c, P]``: Σ t·λ_s of each pair, per token (computed once per chunk)."""
        return self._cross("ts")

    def student_probs_dot_teacher_log_probs(self) -> Tensor:
        """``[c, P]``: Σ s·λ_t of each pair, per token (computed once per chunk)."""
        return self._cross("st")

    def _cross(self, key: str) -> Tensor:
        if key not in self._cross_terms:
            student, teacher, work = self.student, self.teacher, self.work
            self._cross_terms[key] = torch.stack(
                [
                    torch.mul(teacher.probs[t], student.log_probs[s], out=work[0]).sum(dim=-1)
                    if key == "ts"
                    else torch.mul(student.probs[s], teacher.log_probs[t], out=work[0]).sum(dim=-1)
                    for s, t in zip(self.student_rows, self.teacher_rows)
                ],
                dim=1,
            )
        return self._cross_terms[key]


# Each: ``(pairs, *, beta) -> [c, P]`` fp32, the divergence per token of each pair; with ``H⁻ = Σ p·λ``. They equal
# the elementwise definitions up to fp32 rounding (a few 1e-6 nats per token at V = 49152).
def _forward_kl_per_pair(pairs: LayerPairs, *, beta: float) -> Tensor:
    """KL(t‖s) = H⁻_t − Σ t·λ_s."""
    return pairs.teacher.negentropy[list(pairs.teacher_rows)].T - pairs.teacher_probs_dot_student_log_probs()


def _reverse_kl_per_pair(pairs: LayerPairs, *, beta: float) -> Tensor:
    """KL(s‖t) = H⁻_s − Σ s·λ_t."""
    return pairs.student.negentropy[list(pairs.student_rows)].T - pairs.student_probs_dot_teacher_log_probs()


def _symmetric_kl_per_pair(pairs: LayerPairs, *, beta: float) -> Tensor:
    """KL(t‖s) + KL(s‖t), from the same cross terms."""
    return _forward_kl_per_pair(pairs, beta=beta) + _reverse_kl_per_pair(pairs, beta=beta)


def mixture_entropy_sums(teacher_probs: Tensor, student_probs: Tensor, alpha: float) -> Tensor:
    """``[c, V]`` teacher probabilities t and ``[k, c, V]`` student probabilities s -> ``[k, c]``: Σ w·log w over the
    vocabulary for w = t + α·s (``log w`` floored at ``LOG_PROB_FLOOR``, so w = 0 adds 0): the JSD's one pass per
    pair, for k student rows against one teacher row, as one elementwise expression (what ``torch.compile`` fuses
    into a single pass)."""
    mixture = teacher_probs.unsqueeze(0) + alpha * student_probs  # [k, c, V]
    return (mixture * torch.log(mixture).clamp_min(LOG_PROB_FLOOR)).sum(dim=-1)


def _jensen_shannon_per_pair(pairs: LayerPairs, *, beta: float) -> Tensor:
    """Generalised JSD: β·H⁻_t + (1−β)·H⁻_s − Σ m·λ_m, m = β·(t + α·s) with α = (1−β)/β, so
    Σ m·λ_m = β·(log β·Σ w + Σ w·log w) for w = t + α·s (one add, one log, one product per element; ``log w``
    floored at ``LOG_PROB_FLOOR`` so that w = 0 adds 0). Zero for β outside (0, 1)."""
    student, teacher = pairs.student, pairs.teacher
    student_rows, teacher_rows = pairs.student_rows, pairs.teacher_rows
    if beta <= 0.0 or beta >= 1.0:
        return student.negentropy.new_zeros(student.negentropy.shape[1], len(student_rows))
    alpha, log_beta = (1.0 - beta) / beta, math.log(beta)
    num_tokens, vocab_size = student.probs.shape[1:]  # this chunk's (work may be larger)
    w_log_w = pairs.work.new_empty(num_tokens, len(student_rows))  # [c, P]
    if pairs.mixture_sums is not None:  # each teacher row against all its student rows, every token at once
        for teacher_row, columns, rows in _pairs_by_teacher_row(
            student_rows, teacher_rows, len(student_rows)
        ):
            w_log_w[:, columns] = pairs.mixture_sums(teacher.probs[teacher_row], student.probs[rows], alpha).T
    else:
        # Token by token, each teacher row against all its student rows at once: the k student rows of a token
        # (k·V fp32) stay in the CPU's cache while the teacher rows stream past, so each row is read from memory
        # once per token, not once per pair. Each pair's sum is the same row sum as pair by pair.
        max_rows = pairs.work.shape[1]  # work is [2, c', V]: a mixture and its log for up to c' student rows
        for teacher_row, columns, rows in _pairs_by_teacher_row(student_rows, teacher_rows, max_rows):
            k = columns.numel()
            mixture, log_mixture = pairs.work[0, :k, :vocab_size], pairs.work[1, :k, :vocab_size]
            for token in range(num_tokens):
                torch.add(
                    teacher.probs[teacher_row, token].expand(k, -1),
                    student.probs[rows, token],  # [k, V]
                    alpha=alpha,
                    out=mixture,
                )
                torch.log(mixture, out=log_mixture).clamp_min_(LOG_PROB_FLOOR)
                w_log_w[token, columns] = log_mixture.mul_(mixture).sum(dim=-1)
    rows_s, rows_t = list(student_rows), list(teacher_rows)
    mass = teacher.mass[rows_t].T + alpha * student.mass[rows_s].T  # [c, P], Σ w
    return (
        beta * teacher.negentropy[rows_t].T
        + (1.0 - beta) * student.negentropy[rows_s].T
        - beta * (log_beta * mass + w_log_w)
    )


def _pairs_by_teacher_row(
    student_rows: Sequence[int], teacher_rows: Sequence[int], max_rows: int
) -> list[tuple[int, Tensor, slice]]:
    """The pairs grouped by teacher row: ``(teacher row, [k] pair columns, the k student rows)``, the student rows
    a slice of consecutive rows (a view, no copy; a teacher row's student rows that are not consecutive make
    several groups), at most ``max_rows`` of them. Each pair appears once."""
    groups: dict[int, list[tuple[int, int]]] = {}
    for column, (s, t) in enumerate(zip(student_rows, teacher_rows)):
        groups.setdefault(t, []).append((column, s))
    plan = []
    for t, members in groups.items():
        runs: list[list[tuple[int, int]]] = []
        for column, s in members:
            run = runs[-1] if runs else None
            if run is not None and run[-1][1] + 1 == s and len(run) < max_rows:
                run.append((column, s))
            else:
                runs.append([(column, s)])
        for run in runs:
            columns = torch.tensor([column for column, _ in run])
            plan.append((t, columns, slice(run[0][1], run[-1][1] + 1)))
    return plan


def _total_variation_per_pair(pairs: LayerPairs, *, beta: float) -> Tensor:
    """½·Σ|t − s|, one row difference per pair in ``work``."""
    student, teacher, work = pairs.student, pairs.teacher, pairs.work
    return torch.stack(
        [
            torch.sub(teacher.probs[t], student.probs[s], out=work[0]).abs_().sum(dim=-1).mul_(0.5)
            for s, t in zip(pairs.student_rows, pairs.teacher_rows)
        ],
        dim=1,
    )


# ------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class Divergence:
    """One divergence D(student, teacher), everything the library knows about it.

    Attributes:
        name: what the configuration, the command line and the logs call it.
        description: a short line, words then formula (the configuration's help, the model card and
            ``docs/objective.md``).
        label: its name in words, for a figure's axis and title (the lens figures).
        value: ``(λ_s, λ_t, *, beta) -> [...]`` on floored log-probabilities ``[..., V]``, under autograd.
        value_and_grad_: the per-row value and ``∂D/∂λ_s`` in closed form, in place on the fused path's blocks
            (see the comment above the in-place functions).
        per_pair: ``(pairs, *, beta) -> [c, P]``, its value per token of every layer pair of a chunk, from the
            per-layer statistics in a :class:`LayerPairs` (the lens profile).
        unit: the unit of its values ("nats"; "" for a divergence without one).
        masked: its gradient does not vanish where the student's log-probability is floored, so the fused path
            hands it a bool ``[n, V]`` mask of the floored entries.
        uses_beta: it reads ``jsd_beta``.
        per_pair_reads_log_probs: ``per_pair`` reads the layers' log-probabilities (``LayerStatistics.log_probs``),
            not only their probabilities and per-layer sums; without it the lens profile keeps no log-probability
            block of the layers.
    """

    name: str
    description: str
    label: str
    value: Callable[..., torch.Tensor]
    value_and_grad_: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    per_pair: Callable[..., torch.Tensor]
    unit: str = "nats"
    masked: bool = False
    uses_beta: bool = False
    per_pair_reads_log_probs: bool = True


DIVERGENCES: dict[str, Divergence] = {
    record.name: record
    for record in (
        Divergence(
            "fkl",
            "forward KL, KL(teacher ‖ student)",
            label="forward KL",
            value=_forward_kl,
            value_and_grad_=_forward_kl_,
            per_pair=_forward_kl_per_pair,
            masked=True,
        ),
        Divergence(
            "rkl",
            "reverse KL, KL(student ‖ teacher)",
            label="reverse KL",
            value=_reverse_kl,
            value_and_grad_=_reverse_kl_,
            per_pair=_reverse_kl_per_pair,
        ),
        Divergence(
            "skl",
            "symmetric KL (Jeffreys), forward + reverse",
            label="symmetric KL",
            value=_symmetric_kl,
            value_and_grad_=_symmetric_kl_,
            per_pair=_symmetric_kl_per_pair,
            masked=True,
        ),
        Divergence(
            "jsd",
            "generalised Jensen-Shannon, β·KL(teacher ‖ m) + (1−β)·KL(student ‖ m) with m = β·teacher + "
            "(1−β)·student and β = jsd_beta (½: the usual JSD)",
            label="JSD",
            value=_jensen_shannon,
            value_and_grad_=_jensen_shannon_,
            per_pair=_jensen_shannon_per_pair,
            uses_beta=True,
            per_pair_reads_log_probs=False,
        ),
        Divergence(
            "tvd",
            "total variation distance, ½·Σ|teacher − student|",
            label="total variation",
            value=_total_variation,
            value_and_grad_=_total_variation_,
            per_pair=_total_variation_per_pair,
            unit="",
            per_pair_reads_log_probs=False,
        ),
    )
}
"""Every divergence, by name, in the order the choices are offered."""

DIVERGENCE_NAMES: tuple[str, ...] = tuple(DIVERGENCES)


def divergence_record(name: str, field: str = "divergence") -> Divergence:
    """The :class:`Divergence` called ``name``; a ``ValueError`` naming ``field`` if there is none."""
    record = DIVERGENCES.get(name) if isinstance(name, str) else None
    if record is None:
        raise ValueError(
            f"{field}={name!r} is not a known divergence; choose one of {', '.join(DIVERGENCE_NAMES)}."
        )
    return record


def check_divergence_name(name: str, field: str = "divergence") -> str:
    """Return ``name`` if it is a known divergence, else raise a ``ValueError`` naming ``field``."""
    return divergence_record(name, field).name


def describe_divergences() -> str:
    """Every divergence as ``name = description``, separated by ``;`` (the help of a divergence setting)."""
    return "; ".join(f"{record.name} = {record.description}" for record in DIVERGENCES.values())


def divergence_from_log_probs(
    name: str, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, *, beta: float = 0.5
) -> torch.Tensor:
    """Divergence ``name`` between fp32 log-probabilities floored at ``LOG_PROB_FLOOR`` (see :func:`log_probs`).

    For callers that reuse one side's log-probabilities many times (the lens diagnostics). The inputs
    broadcast: ``[1, N, V]`` against ``[L, N, V]`` gives ``[L, N]``.
    """
    return divergence_record(name).value(student_log_probs, teacher_log_probs, beta=beta)


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
        name: one of :data:`DIVERGENCE_NAMES` (see :data:`DIVERGENCES`).
        student_logits: ``[..., V]``.
        teacher_logits: ``[..., V]``, same shape; detached by the caller if it must not get gradients.
        temperature: both sides are divided by it before the softmax (no T² rescaling).
        beta: the mixture weight of a divergence that ``uses_beta``; ignored by the others.
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
