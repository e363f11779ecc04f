"""The teacher's side of the objective read from a cache instead of computed by a teacher forward.

A :class:`TeacherSignals` holds, for the response tokens of one micro-batch (in the order
:func:`~distillens_trainer.loss.response_tokens.select_response` gives them: row by row, position by position),
what the objective needs from the teacher at each teacher ``hidden_states`` index it reads (the mapped lens
layers, and ``num_layers`` for the output term): either the teacher's LM-head inputs (``hidden`` cache: the
head then gives the exact logits) or its top-k buckets (``topk`` cache, see :mod:`.topk_divergence`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .topk import TopKDistribution


@dataclass(frozen=True)
class TeacherSignals:
    """Per teacher layer: ``head_inputs[layer]`` ``[N, d]`` (hidden mode) or ``topk[layer]`` (topk mode);
    ``output_layer`` is the teacher's ``num_layers`` (its last hidden state, the output term's input)."""

    output_layer: int
    head_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    topk: dict[int, TopKDistribution] = field(default_factory=dict)

    @property
    def layers(self) -> set[int]:
        return set(self.head_inputs) | set(self.topk)

    def check_layers(self, layers: set[int]) -> None:
        """ValueError unless every teacher layer in ``layers`` is held."""
        missing = sorted(layers - self.layers)
        if missing:
            raise ValueError(
                f"the cached teacher signals lack teacher layers {missing} (held: {sorted(self.layers)}): rebuild "
                "the cache with this layer map."
            )
