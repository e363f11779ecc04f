"""The paper's feature baseline (off by default): MSE between a learned linear map of the teacher's hidden
states and the student's, on the lens's layer pairs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layer_map import LayerPair


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
