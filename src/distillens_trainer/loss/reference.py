"""The objective's divergence terms computed the straightforward way, on full ``[N, V]`` logits: the reference
the fused, chunked path (``fused.py``) is tested against, and the fallback for heads it cannot fuse."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .divergences import token_divergence
from .spec import ObjectiveSpec
from .topk import TopKDistribution, topk_divergence

# A logit lens: ``(hidden [N, d], hidden_states index) -> logits [N, V]`` (``lens.LogitLens`` is one).
Lens = Callable[[torch.Tensor, int], torch.Tensor]


def shared_columns(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[..., V_full] -> [..., vocab_size]``; no slice (and no slice backward) when nothing is padded."""
    return logits if logits.shape[-1] == vocab_size else logits[..., :vocab_size]


def divergence_sum(
    name: str,
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopKDistribution,
    spec: ObjectiveSpec,
) -> torch.Tensor:
    """Σ over the ``[N, V]`` rows of divergence ``name``, student first, at the spec's temperature and β; the
    teacher as ``[N, V]`` logits, or as top-k buckets from a ``topk`` cache (then over k + 1 buckets)."""
    if isinstance(teacher, TopKDistribution):
        return topk_divergence(
            name, student_logits, teacher, temperature=spec.temperature, beta=spec.jsd_beta
        ).sum()
    return token_divergence(
        name, student_logits, teacher, temperature=spec.temperature, beta=spec.jsd_beta
    ).sum()


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
    return divergence_sum(spec.lens_divergence, student_logits, teacher_logits, spec)
