"""The objective's terms computed the straightforward way, on full ``[N, V]`` logits (the reference path).

Also the response-token selection every term shares. The fused, chunked path is in ``fused.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .divergences import token_divergence
from .layer_map import LayerPair
from .lens import LogitLens
from .modeling import IGNORE_INDEX

if TYPE_CHECKING:
    from .objective import ObjectiveSpec


def lens_term_name(student_layer: int, teacher_layer: int) -> str:
    return f"lens/s{student_layer}_t{teacher_layer}"


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T] -> [B, T-1]`` bool: positions whose next token is a response (target) token."""
    return labels[:, 1:] != IGNORE_INDEX


def select_response(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, ...]`` values at positions predicting a response token -> ``[N, ...]``."""
    return per_position[:, :-1][mask]


def shared_columns(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[..., V_full] -> [..., vocab_size]``; no slice (and no slice backward) when nothing is padded."""
    return logits if logits.shape[-1] == vocab_size else logits[..., :vocab_size]


def divergence_sum(
    name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, spec: ObjectiveSpec
):
    return token_divergence(
        name, student_logits, teacher_logits, temperature=spec.temperature, beta=spec.jsd_beta
    ).sum()


def lens_pair_sum(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_layer: int,
    teacher_layer: int,
    student_lens: LogitLens,
    teacher_lens: LogitLens,
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


class FeatureProjector(nn.Module):
    """One learned linear map per layer pair, teacher hidden size -> student hidden size (feature baseline)."""

    def __init__(
        self, layer_map: Sequence[LayerPair], teacher_hidden_size: int, student_hidden_size: int
    ) -> None:
        super().__init__()
        self.maps = nn.ModuleDict(
            {f"s{s}_t{t}": nn.Linear(teacher_hidden_size, student_hidden_size) for s, t in layer_map}
        )

    def forward(self, teacher_hidden: torch.Tensor, student_layer: int, teacher_layer: int) -> torch.Tensor:
        """``[N, d_t] -> [N, d_s]``."""
        projection = self.maps[f"s{student_layer}_t{teacher_layer}"]
        return projection(teacher_hidden.to(projection.weight.dtype))


def feature_pair_sum(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, projected: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ over tokens of the per-token mean squared error ``mean_d (W·h_t − h_s)²``; ``[N, d_s]`` inputs."""
    target = projected if projected is not None else teacher_hidden
    return (target.float() - student_hidden.float()).pow(2).mean(dim=-1).sum()
