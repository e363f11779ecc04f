"""The objective's contract with the models' forwards: what each forward must return (:class:`ForwardRequest`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ForwardRequest:
    """What the objective needs from the forwards of one micro-batch (see
    :meth:`~distillens_trainer.loss.objective.DistillLensObjective.forward_request`).

    Attributes:
        both_hidden_states: both models return ``hidden_states`` (the lens or feature term reads them).
        fused_output: the output CE/KD term is computed from ``hidden_states[-1]`` through the fused head, so
            both models return hidden states and, where their forward takes it, logits for one position only.
        student_keeps_logits / teacher_keeps_logits: the model's forward takes ``logits_to_keep``.
        student_full_logits: the caller keeps the student's full logits (evaluation with ``compute_metrics``):
            the student's forward returns them even where the output term runs fused; the loss never reads them.
    """

    both_hidden_states: bool
    fused_output: bool
    student_keeps_logits: bool = False
    teacher_keeps_logits: bool = False
    student_full_logits: bool = False

    def forward_kwargs(self, role: str) -> dict[str, Any]:
        """Keyword arguments for the ``role`` (``"student"`` or ``"teacher"``) model's forward."""
        if role == "student":
            keeps_logits = self.student_keeps_logits and not self.student_full_logits
        else:
            keeps_logits = self.teacher_keeps_logits
        kwargs: dict[str, Any] = {"output_hidden_states": self.both_hidden_states or self.fused_output}
        if self.fused_output and keeps_logits:
            kwargs["logits_to_keep"] = 1
        return kwargs
