"""The non-finite guard: weights checked before training, every training micro-batch's loss and terms and every
step's gradients checked during it.

A NaN or infinite value anywhere in the objective spreads to every weight in one optimizer step, and the Trainer
would log it as a loss of 0.0 (its ``logging_nan_inf_filter``) and save the non-finite model. Here:

- :func:`refuse_nonfinite_weights`: a model whose floating-point weights hold NaN or inf is refused before
  training (one exact pass over the weights, their minimum and maximum: cheaper than a probe forward and exact for
  "a NaN weight"; a teacher with finite weights and non-finite outputs is caught by the guard at the first step, before
  any update);
- :func:`nonfinite_terms` and :func:`nonfinite_sources`: what went non-finite in a micro-batch and where the
  values came from (the teacher's outputs, the teacher cache's signals, the student's outputs or weights);
- :class:`NonFiniteTrainingError`: the one line training stops with (``nonfinite_policy="stop"``, the default);
- :func:`drop_update`: how a step is skipped instead (``nonfinite_policy="skip"``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..loss.teacher_signals import TeacherSignals

# dtypes whose values can be NaN or inf (float8 and integer / quantised storage are not checked)
CHECKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class NonFiniteTrainingError(ValueError):
    """Training stopped at the first non-finite loss, loss term or gradient (``nonfinite_policy="stop"``).

    A ``ValueError``, so ``distillens train`` prints its one line and exits 1; raised before the step's
    optimizer update, so no non-finite model is saved and the checkpoints already written are kept."""


def _local_tensor(tensor: torch.Tensor) -> torch.Tensor | None:
    """The values this process holds of a parameter (its shard under FSDP2 or ZeRO-3); None when there are
    none to check (a meta tensor, integer or quantised storage)."""
    if hasattr(tensor, "ds_tensor"):  # DeepSpeed ZeRO-3: the parameter itself is an empty placeholder
        tensor = tensor.ds_tensor
    if hasattr(tensor, "to_local"):  # DTensor (FSDP2)
        tensor = tensor.to_local()
    if tensor.is_meta or tensor.dtype not in CHECKED_DTYPES or tensor.numel() == 0:
        return None
    return tensor


def _is_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite: the minimum and maximum in one pass, no copy (NaN propagates into both, an
    infinity is one of them; exact, where a sum could overflow on finite values)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value of every tensor (the local shard of a sharded one) is finite: one ``aminmax`` per tensor
    and one host sync per device."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        local = _local_tensor(tensor)
        if local is not None:
            low, high = torch.aminmax(local.detach())
            flags.setdefault(local.device, []).append(torch.isfinite(low) & torch.isfinite(high))
    return all(bool(torch.stack(device_flags).all()) for device_flags in flags.values())


def count_nonfinite(tensor: torch.Tensor) -> int:
    """How many values of ``tensor`` are NaN or infinite."""
    return int((~torch.isfinite(tensor.detach())).sum())


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, int, int]]:
    """``(name, non-finite count, size)`` of every named floating-point tensor holding NaN or inf."""
    found = []
    for name, tensor in named:
        local = _local_tensor(tensor)
        if local is not None and not _is_finite(local):
            found.append((name, count_nonfinite(local), local.numel()))
    return found


def _model_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def describe_tensors(found: list[tuple[str, int, int]]) -> str:
    """``"3 of 2,048 values of layers.0.weight, and 2 other tensors"``."""
    name, bad, size = found[0]
    others = f", and {len(found) - 1} other tensor{'s' if len(found) > 2 else ''}" if len(found) > 1 else ""
    return f"{bad:,} of {size:,} values of {name}{others}"


def refuse_nonfinite_weights(model: nn.Module | None, role: str, fix: str) -> None:
    """ValueError (one line) when ``model``'s weights or buffers hold NaN or inf: ``role`` names the model
    (``"the teacher"``), ``fix`` what to do."""
    if model is None or all_finite(tensor for _, tensor in _model_tensors(model)):
        return
    found = nonfinite_tensors(_model_tensors(model))
    if found:
        raise ValueError(
            f"{role}'s weights hold non-finite values (NaN or inf: {describe_tensors(found)}), so every loss "
            f"would be non-finite: {fix}."
        )


def nonfinite_terms(loss: torch.Tensor, term_sums: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The non-finite ones among ``loss`` and the terms, by name (empty when all are finite: one host sync)."""
    names = ["loss", *term_sums]
    values = torch.stack(
        [loss.detach().float().reshape(()), *(v.detach().float().reshape(()) for v in term_sums.values())]
    )
    if bool(torch.isfinite(values).all()):
        return {}
    return {name: value for name, value in zip(names, values.tolist()) if not math.isfinite(value)}


def _output_tensors(outputs: Any, attention_mask: torch.Tensor | None) -> Iterator[tuple[str, torch.Tensor]]:
    """A model output's logits and hidden states (positions the attention mask excludes left out)."""
    if outputs is None:
        return
    logits = getattr(outputs, "logits", None)
    hidden_states = getattr(outputs, "hidden_states", None) or ()
    named = ([("logits", logits)] if torch.is_tensor(logits) else []) + [
        (f"hidden_states[{index}]", state)
        for index, state in enumerate(hidden_states)
        if torch.is_tensor(state)
    ]
    for name, tensor in named:
        if attention_mask is not None and tensor.shape[:2] == attention_mask.shape:
            tensor = tensor[attention_mask.bool()]
        yield name, tensor


def _names(found: list[tuple[str, int, int]]) -> str:
    """``"logits: 256 non-finite, hidden_states [0, 1, 2]"``: a count per tensor, the hidden states by index."""
    prefix = "hidden_states["
    hidden = [name.removeprefix(prefix).rstrip("]") for name, _, _ in found if name.startswith(prefix)]
    parts = [f"{name}: {bad:,} non-finite" for name, bad, _ in found if not name.startswith(prefix)]
    if hidden:
        parts.append(f"hidden_states [{', '.join(hidden)}]")
    return ", ".join(parts)


def nonfinite_sources(
    *,
    student: nn.Module,
    student_outputs: Any,
    teacher: TeacherSignals | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[list[str], bool]:
    """Where a micro-batch's non-finite values came from, as phrases, and whether the student's own weights are
    non-finite (then skipping a step cannot help). Checked in the order the values flow: the teacher's side
    first (its model's outputs or a cache's signals: ``teacher``), then the student's outputs and weights; when every
    input is finite, the objective itself overflowed."""
    sources = []
    found = nonfinite_tensors(teacher.named_tensors(attention_mask)) if teacher is not None else []
    if found:
        sources.append(teacher.source_phrase(_names(found)))
    student_weights = (
        []
        if all_finite(t for _, t in _model_tensors(student))
        else nonfinite_tensors(_model_tensors(student))
    )
    if student_weights:
        sources.append(f"the student's weights ({describe_tensors(student_weights)})")
    else:
        found = nonfinite_tensors(_output_tensors(student_outputs, attention_mask))
        if found:
            sources.append(f"the student's outputs ({_names(found)}; its weights are finite)")
    if not sources:
        sources.append(
            "the objective itself: the student's and the teacher's values are finite, so a term overflowed "
            "(check the loss weights and the temperature)"
        )
    return sources, bool(student_weights)


@dataclass
class NonFiniteEvent:
    """The first non-finite micro-batch of an optimizer step (no terms: its gradients alone)."""

    step: int
    terms: dict[str, float] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    student_weights: bool = False  # the student's own weights are non-finite: skipping cannot help

    def describe(self, gradients: list[tuple[str, int, int]]) -> str:
        """``"step 3: loss=nan, kd_loss=nan are not finite, from the teacher's outputs (...)"``; ``gradients``: the
        non-finite gradients (after clipping), named when the loss and its terms were finite."""
        if not self.terms:
            return (
                f"step {self.step}: the gradients are not finite ({describe_tensors(gradients)}) while the loss and "
                "its terms are: an exploding update (lower learning_rate, or set max_grad_norm)"
            )
        values = ", ".join(f"{name}={value}" for name, value in self.terms.items())
        source = "; ".join(self.sources) if self.sources else "another process (see its log)"
        return (
            f"step {self.step}: {values} {'is' if len(self.terms) == 1 else 'are'} not finite, from {source}"
        )


def drop_update(optimizer: torch.optim.Optimizer) -> None:
    """Make the coming ``optimizer.step()`` change nothing: every gradient is dropped, and torch optimizers skip
    parameters without one (no momentum, no weight decay, no step count)."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            parameter.grad = None


@dataclass
class StepCounts:
    """Optimizer steps taken and skipped under ``nonfinite_policy="skip"``, since the last training log (``window_``)
    and in this ``train()`` call (``run_``)."""

    window_steps: int = 0
    window_skipped: int = 0
    run_steps: int = 0
    run_skipped: int = 0

    def count_step(self) -> None:
        self.window_steps += 1
        self.run_steps += 1

    def count_skip(self) -> None:
        self.window_skipped += 1
        self.run_skipped += 1

    def correct_logs(self, logs: dict[str, float]) -> None:
        """``loss`` (and ``train_loss``) as means over the applied steps, with the number of skipped steps
        (``skipped_steps``, ``train_skipped_steps``); a window whose every step was skipped logs no ``loss`` (never
        0.0). A training log (one with ``loss``) starts the next window."""
        for key, steps, skipped, name in (
            ("loss", self.window_steps, self.window_skipped, "skipped_steps"),
            ("train_loss", self.run_steps, self.run_skipped, "train_skipped_steps"),
        ):
            if key not in logs:
                continue
            if skipped and steps > skipped:
                logs[key] *= steps / (steps - skipped)
            elif skipped:
                del logs[key]
            logs[name] = skipped
        if "loss" in logs or "skipped_steps" in logs:
            self.window_steps = self.window_skipped = 0
