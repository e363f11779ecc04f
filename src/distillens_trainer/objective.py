"""The DistillLens objective as a pure function of model outputs.

loss = ce_weight·CE + kd_weight·D_out(student, teacher) + lens_weight·mean_pairs D_lens(lens_s(h_s), lens_t(h_t))
       [+ feature_weight·mean_pairs MSE(W·h_t, h_s), the paper's feature baseline, off by default]

Every term is a sum over response tokens (labels ≠ -100 after the causal shift) divided by one
denominator: the number of response tokens in the whole gradient-accumulation window when the Trainer
provides it (``num_items_in_batch``), else in this batch. Tokens are selected per sample before any
vocabulary-sized tensor is built, so a sample's contribution never depends on its neighbours or on
padding, and only response positions ever reach the LM heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .divergences import token_divergence
from .layer_map import LayerPair
from .lens import LogitLens

IGNORE_INDEX = -100


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


def lens_term_name(student_layer: int, teacher_layer: int) -> str:
    return f"lens/s{student_layer}_t{teacher_layer}"


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T] -> [B, T-1]`` bool: positions whose next token is a response (target) token."""
    return labels[:, 1:] != IGNORE_INDEX


def select_response(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, ...]`` values at positions predicting a response token -> ``[N, ...]``."""
    return per_position[:, :-1][mask]


def _divergence_sum(
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
    student_logits = student_lens(student_hidden, student_layer)[..., :vocab_size]
    with torch.no_grad():
        teacher_logits = teacher_lens(teacher_hidden, teacher_layer)[..., :vocab_size]
    return _divergence_sum(spec.lens_divergence, student_logits, teacher_logits, spec)


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


def distillens_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    spec: ObjectiveSpec,
    *,
    vocab_size: int | None = None,
    student_hidden_states: Sequence[torch.Tensor] | None = None,
    teacher_hidden_states: Sequence[torch.Tensor] | None = None,
    student_lens: LogitLens | None = None,
    teacher_lens: LogitLens | None = None,
    layer_map: Sequence[LayerPair] = (),
    num_items_in_batch: int | torch.Tensor | None = None,
    feature_projector: FeatureProjector | None = None,
) -> ObjectiveOutput:
    """The weighted DistillLens loss of one micro-batch.

    Args:
        student_logits: ``[B, T, V_s]``.
        teacher_logits: ``[B, T, V_t]`` (no grad), or None for plain SFT (kd and lens weights 0).
        labels: ``[B, T]`` unshifted, -100 on prompt and padding.
        vocab_size: the shared real vocabulary; logits are compared on ``[..., :vocab_size]``.
        student_hidden_states / teacher_hidden_states: HF ``hidden_states`` tuples, each ``[B, T, d]``.
        layer_map: (student, teacher) ``hidden_states`` indices for the lens term.
        num_items_in_batch: response tokens in the whole accumulation window (and across devices).
        feature_projector: the learned maps of the feature baseline (needed when ``feature_weight > 0``).
    """
    mask = response_mask(labels)
    num_tokens = int(mask.sum())
    denominator = float(num_items_in_batch) if num_items_in_batch is not None else float(num_tokens)
    denominator = max(denominator, 1.0)
    vocab_size = vocab_size or student_logits.shape[-1]

    student_selected = select_response(student_logits, mask)[:, :vocab_size]  # [N, V]
    targets = labels[:, 1:][mask]  # [N]
    terms: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}

    ce_sum = F.cross_entropy(
        student_selected.float(), targets, reduction="sum", label_smoothing=spec.label_smoothing_factor
    )
    terms["ce_loss"] = ce_sum
    total = spec.ce_weight * ce_sum if spec.ce_weight > 0 else ce_sum.new_zeros(())

    if teacher_logits is not None:
        teacher_selected = select_response(teacher_logits, mask)[:, :vocab_size].detach()
        with torch.set_grad_enabled(torch.is_grad_enabled() and spec.kd_weight > 0):
            kd_sum = _divergence_sum(spec.kd_divergence, student_selected, teacher_selected, spec)
        terms["kd_loss"] = kd_sum
        if spec.kd_weight > 0:
            total = total + spec.kd_weight * kd_sum

    if spec.uses_lens and layer_map:
        if student_hidden_states is None or teacher_hidden_states is None or student_lens is None:
            raise ValueError("the lens term needs both models' hidden_states and their LogitLens.")
        pair_sums = []
        for student_layer, teacher_layer in layer_map:
            pair_sum = lens_pair_sum(
                select_response(student_hidden_states[student_layer], mask),
                select_response(teacher_hidden_states[teacher_layer], mask).detach(),
                student_layer,
                teacher_layer,
                student_lens,
                teacher_lens,
                vocab_size,
                spec,
            )
            sums[lens_term_name(student_layer, teacher_layer)] = pair_sum.detach()
            pair_sums.append(pair_sum)
        lens_sum = torch.stack(pair_sums).mean()
        terms["lens_loss"] = lens_sum
        total = total + spec.lens_weight * lens_sum

    if spec.feature_weight > 0 and layer_map:
        if student_hidden_states is None or teacher_hidden_states is None or feature_projector is None:
            raise ValueError("the feature term needs both models' hidden_states and a FeatureProjector.")
        feature_sums = []
        for student_layer, teacher_layer in layer_map:
            teacher_hidden = select_response(teacher_hidden_states[teacher_layer], mask).detach()
            projected = feature_projector(teacher_hidden, student_layer, teacher_layer)
            student_hidden = select_response(student_hidden_states[student_layer], mask)
            feature_sums.append(feature_pair_sum(student_hidden, teacher_hidden, projected))
        feature_sum = torch.stack(feature_sums).mean()
        terms["feature_loss"] = feature_sum
        total = total + spec.feature_weight * feature_sum

    term_sums = {name: value.detach() for name, value in terms.items()} | sums
    return ObjectiveOutput(
        loss=total / denominator, term_sums=term_sums, num_tokens=num_tokens, denominator=denominator
    )
