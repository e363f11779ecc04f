"""The objective's divergence terms computed the straightforward way, on full ``[N, V]`` logits: the reference
the fused, chunked path (``fused.py``) is tested against, and the fallback for heads it cannot fuse."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .divergences import token_divergence
from .spec import ObjectiveSpec

# A logit lens: ``(hidden [N, d], hidden_states index) -> logits [N, V]`` (``lens.LogitLens`` is one).
Lens = Callable[[torch.Tensor, int], torch.Tensor]


def shared_columns(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[..., V_full] -> [..., vocab_size]``; no slice (and no slice backward) when nothing is padded."""
    return logits if logits.shape[-1] == vocab_size else logits[..., :vocab_size]


class TeacherDistribution(Protocol):
    """The teacher's next-token distributions at ``N`` positions, as the straightforward terms read them:
    :class:`TeacherLogits` (``[N, V]`` logits) or :class:`~distillens_trainer.loss.topk.TopKDistribution` (top-k
    buckets and a tail, a ``topk`` cache)."""

    def divergence_sum(
        self, name: str, student_logits: torch.Tensor, *, temperature: float, beta: float
    ) -> torch.Tensor:
        """Σ over the ``N`` rows of divergence ``name`` (student first) against ``student_logits`` ``[N, V]``."""
        ...


@dataclass(frozen=True)
class TeacherLogits:
    """The teacher as ``[N, V]`` logits (no grad): a :class:`TeacherDistribution`."""

    logits: torch.Tensor

    def divergence_sum(
        self, name: str, student_logits: torch.Tensor, *, temperature: float, beta: float
    ) -> torch.Tensor:
        return token_divergence(name, student_logits, self.logits, temperature=temperature, beta=beta).sum()


def divergence_sum(
    name: str, student_logits: torch.Tensor, teacher: TeacherDistribution, spec: ObjectiveSpec
) -> torch.Tensor:
    """Σ over the ``[N, V]`` rows of divergence ``name``, student first, at the spec's temperature and β."""
    return teacher.divergence_sum(name, student_logits, temperature=spec.temperature, beta=spec.jsd_beta)


def lens_pair_sum(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_layer: int,
    teacher_layer: int,
    student_lens: Lens,
    teacher_lens: Lens,
    vocab_size: int,
    spec: ObjectiveSpec,
) -> torch.Tensor:
    """Σ over tokens of D_lens for one layer pair.

    Args:
        student_hidden: ``[N, d_s]`` student residual stream at response positions.
        teacher_hidden: ``[N, d_t]`` teacher residual stream at the same positions (no grad).
    Returns:
        scalar fp32 sum; only one pair's ``[N, V]`` logits exist at a time.
    """
    student_logits = shared_columns(student_lens(student_hidden, student_layer), vocab_size)
    with torch.no_grad():
        teacher_logits = shared_columns(teacher_lens(teacher_hidden, teacher_layer), vocab_size)
    return divergence_sum(spec.lens_divergence, student_logits, TeacherLogits(teacher_logits), spec)
