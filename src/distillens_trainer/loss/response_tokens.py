"""Which positions the objective trains on: those whose next token is a response token (labels != -100,
shifted by one). Every term selects them before any vocabulary-sized tensor is built."""

from __future__ import annotations

import torch

from ..models.facts import IGNORE_INDEX


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T] -> [B, T-1]`` bool: positions whose next token is a response (target) token."""
    return labels[:, 1:] != IGNORE_INDEX


def select_response(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, ...]`` values at positions predicting a response token -> ``[N, ...]``."""
    return per_position[:, :-1][mask]
