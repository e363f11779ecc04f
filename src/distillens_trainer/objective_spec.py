"""What the DistillLens objective is asked to compute (:class:`ObjectiveSpec`) and what it returns
(:class:`ObjectiveOutput`); the computation itself is :class:`~distillens_trainer.objective.DistillLensObjective`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ObjectiveSpec:
    """Weights and divergences of the objective (mirrors the fields of ``DistillLensConfig``)."""

    ce_weight: float = 0.0
    kd_weight: float = 1.0
    kd_divergence: str = "rkl"
    lens_weight: float = 1.0
    lens_divergence: str = "jsd"
    jsd_beta: float = 0.5
    temperature: float = 1.0
    feature_weight: float = 0.0
    label_smoothing_factor: float = 0.0  # smooths the CE term, as in Trainer

    @property
    def term_weights(self) -> dict[str, float]:
        """Weight of each logged term in the loss: ``loss = Σ weight · term`` (per-pair lens terms excluded)."""
        return {
            "ce_loss": self.ce_weight,
            "kd_loss": self.kd_weight,
            "lens_loss": self.lens_weight,
            "feature_loss": self.feature_weight,
        }

    @property
    def needs_teacher(self) -> bool:
        return self.kd_weight > 0 or self.lens_weight > 0 or self.feature_weight > 0

    @property
    def uses_lens(self) -> bool:
        return self.lens_weight > 0

    @property
    def uses_hidden_states(self) -> bool:
        return self.lens_weight > 0 or self.feature_weight > 0


@dataclass
class ObjectiveOutput:
    """The objective on one micro-batch.

    Attributes:
        loss: scalar with gradient, weighted sum of the terms, each divided by ``denominator``.
        term_sums: detached, unweighted per-term sums over response tokens (``ce_loss``, ``kd_loss``,
            ``lens_loss`` and one ``lens/s{i}_t{j}`` per layer pair); divide by a token count to log.
        num_tokens: response tokens in this micro-batch.
        denominator: what the sums were divided by in ``loss``.
    """

    loss: torch.Tensor
    term_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    num_tokens: int = 0
    denominator: float = 1.0
