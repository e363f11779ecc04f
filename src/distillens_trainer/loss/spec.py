"""What the DistillLens objective is asked to compute (:class:`ObjectiveSpec`, validated here: the one place
each loss setting is checked) and what it returns (:class:`ObjectiveOutput`, its terms named by
:func:`lens_term_name` and :data:`TERM_NAMES`); the computation itself is
:class:`~distillens_trainer.loss.objective.DistillLensObjective`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .divergences import PAPER_KD_DIVERGENCE, PAPER_LENS_DIVERGENCE, check_divergence_name

# head_chunk_size="auto": the fused path picks the chunk from the vocabulary (fused.resolve_chunk_size)
AUTO_CHUNK = "auto"
DEFAULT_CHUNK_SIZE = AUTO_CHUNK
WEIGHT_NAMES: tuple[str, ...] = ("ce_weight", "kd_weight", "lens_weight", "feature_weight")
# The largest float32: a loss weight beyond it is infinite once the loss (computed in float32) is weighted.
MAX_WEIGHT = float(torch.finfo(torch.float32).max)
# The lowest softmax temperature. Dividing logits by T makes every token more than 104·T logits below the top
# exactly zero in float32 (exp underflows below e^-104), so at T < 0.01 only the tokens within about one logit of
# the top keep any probability: both distributions are nearly one-hot, the divergences grow as 1/T and their
# gradients vanish (measured on Gaussian logits of std 3 over 32,000 tokens, reverse KL: loss 8.8 at T=1, 1,290
# at 0.01, 9,750 at 0.001 with a 200x smaller gradient, 10,000 with a zero gradient at 1e-30). Distillation uses
# T between about 0.5 and 10.
MIN_TEMPERATURE = 0.01


def lens_term_name(student_layer: int, teacher_layer: int) -> str:
    """The logged name of one layer pair's lens term: ``lens/s{i}_t{j}``."""
    return f"lens/s{student_layer}_t{teacher_layer}"


def check_temperature_and_beta(temperature: float, beta: float) -> None:
    """ValueError naming the field when the softmax temperature or the JSD β is out of range."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    if not math.isfinite(temperature):
        raise ValueError(
            f"temperature={temperature} must be a finite number (1 = the models' own distributions)."
        )
    if temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature={temperature} is below {MIN_TEMPERATURE}: the softmax is then nearly one-hot in float32, so "
            "the loss grows as 1/temperature while its gradient vanishes; use a temperature of about 0.5 to 10."
        )
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd_beta={beta} must lie in [0, 1].")


def check_chunk_size(chunk_size: int | str, *, name: str = "head_chunk_size", smallest: int = 0) -> int | str:
    """The one rule for a chunk size: ``"auto"`` or an integer >= ``smallest``; a string of digits (a command
    line's) becomes its integer. ``head_chunk_size`` takes 0 (the straightforward computation); the fused loop
    itself (``fused.fused_head_loss``) needs ``smallest=1``. ValueError naming ``name`` otherwise."""
    if isinstance(chunk_size, str) and chunk_size.strip().isdigit():
        chunk_size = int(chunk_size)
    if chunk_size == AUTO_CHUNK or (
        isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= smallest
    ):
        return chunk_size
    meaning = "tokens per chunk; 0 = no chunking" if smallest == 0 else "tokens per chunk"
    raise ValueError(f"{name}={chunk_size!r} must be 'auto' or an integer >= {smallest} ({meaning}).")


@dataclass(frozen=True)
class ObjectiveSpec:
    """Weights and divergences of the objective (mirrors the fields of ``DistillLensConfig``)."""

    ce_weight: float = 0.0
    kd_weight: float = 1.0
    kd_divergence: str = PAPER_KD_DIVERGENCE
    lens_weight: float = 1.0
    lens_divergence: str = PAPER_LENS_DIVERGENCE
    jsd_beta: float = 0.5
    temperature: float = 1.0
    feature_weight: float = 0.0
    label_smoothing_factor: float = 0.0  # smooths the CE term, as in Trainer

    def __post_init__(self) -> None:
        for name in WEIGHT_NAMES:
            value = getattr(self, name)
            if not (math.isfinite(value) and abs(value) <= MAX_WEIGHT):
                raise ValueError(
                    f"{name}={value} is not a finite number: loss weights must be finite numbers >= 0 (0 = term off)."
                )
            if not value >= 0:
                raise ValueError(f"{name}={value} is negative; loss weights must be >= 0.")
        if all(getattr(self, name) == 0 for name in WEIGHT_NAMES):
            raise ValueError(
                "ce_weight, kd_weight, lens_weight and feature_weight are all 0: set at least one to a positive value."
            )
        check_divergence_name(self.kd_divergence, "kd_divergence")
        check_divergence_name(self.lens_divergence, "lens_divergence")
        check_temperature_and_beta(self.temperature, self.jsd_beta)
        if not 0.0 <= self.label_smoothing_factor < 1.0:
            raise ValueError(
                f"label_smoothing_factor={self.label_smoothing_factor} must lie in [0, 1) (0 = no smoothing)."
            )

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
