"""The trainer's input adapters: what a script written for ``transformers.Trainer`` hands the trainer, made to fit
the DistillLens objective.

- ``num_items_in_batch`` as ``nn.DataParallel`` delivers it (a ``[n_gpu, 1]`` tensor) -> one token count;
- a half-precision student under mixed precision -> fp32 master weights (else AdamW updates round away);
- ``Trainer`` arguments the objective replaces (``compute_loss_func``) -> refused with the fix.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn
from transformers import Trainer

logger = logging.getLogger(__name__)

HALF_DTYPES = (torch.bfloat16, torch.float16)


def token_count(
    num_items_in_batch: torch.Tensor | int | float | None, *, n_gpu: int = 1, averaged: bool = True
):
    """The accumulation window's response-token count as one number (None stays None).

    Under single-process ``nn.DataParallel`` (``n_gpu > 1``) ``Trainer`` expands the count to ``[n_gpu, 1]``,
    every row the same value, so the model's replicas can each take a row; the loss here is computed once, over
    the gathered outputs, so one row is the count. Without ``average_tokens_across_devices`` ``Trainer`` has
    also divided that count by ``n_gpu`` (each replica averages its share); it is multiplied back.
    """
    if num_items_in_batch is None:
        return None
    if torch.is_tensor(num_items_in_batch):
        rows = num_items_in_batch.detach().flatten()
        if rows.numel() == 0:
            return None
        count = float(rows[0])
    else:
        count = float(num_items_in_batch)
    if n_gpu > 1 and not averaged:
        count *= n_gpu
    return count


def upcast_half_trainable_parameters(model: nn.Module) -> int:
    """Trainable bf16/fp16 parameters moved to fp32 in place (master weights); returns how many.

    Mixed precision (``bf16=True``/``fp16=True``) autocasts the computation but updates the parameters in their
    own dtype: a bf16 weight ignores any AdamW step smaller than 2⁻⁸ of its magnitude. Frozen parameters (a
    PEFT base model) keep their dtype. Tied weights are one ``Parameter`` and are converted once.
    """
    converted = 0
    for parameter in {id(p): p for p in model.parameters()}.values():
        if parameter.requires_grad and parameter.dtype in HALF_DTYPES:
            parameter.data = parameter.data.float()
            converted += 1
    return converted


def trainer_argument(name: str, trainer_args: tuple[Any, ...], trainer_kwargs: dict[str, Any]) -> Any:
    """The value of ``Trainer.__init__`` argument `name` among the arguments after ``model, args``."""
    signature = inspect.signature(Trainer.__init__)
    bound = signature.bind_partial(None, None, None, *trainer_args, **trainer_kwargs)
    return bound.arguments.get(name)


def refuse_compute_loss_func(trainer_args: tuple[Any, ...], trainer_kwargs: dict[str, Any]) -> None:
    """ValueError when a ``compute_loss_func`` is passed: the DistillLens objective is the loss."""
    if trainer_argument("compute_loss_func", trainer_args, trainer_kwargs) is not None:
        raise ValueError(
            "compute_loss_func is not used by DistillLensTrainer, whose loss is the DistillLens objective: drop it "
            "(use ce_weight for cross-entropy, label_smoothing_factor to smooth it)."
        )


def tokenizer_of(processing_class: Any) -> Any | None:
    """The tokenizer inside a processing class (a tokenizer itself, or a processor holding one)."""
    if processing_class is None:
        return None
    if hasattr(processing_class, "get_vocab"):
        return processing_class
    return getattr(processing_class, "tokenizer", None)
