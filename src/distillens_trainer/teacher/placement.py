"""Placing the frozen teacher for multi-process training: replicated, or sharded with DeepSpeed ZeRO-3 or FSDP2.

* DeepSpeed ZeRO-3: the teacher becomes a DeepSpeed engine of its own, with its parameters partitioned
  across the data-parallel ranks like the student's, and no optimizer. Its forward (and the logit lens,
  which calls the final norm and the LM head as modules) gathers each module's weights on the fly, so
  every rank must run the teacher in lockstep, which it does: every rank computes the loss.
* DeepSpeed ZeRO-1/2, DDP, a single process: every rank holds a full, frozen copy in eval mode, on its
  device, in the resolved teacher dtype (ZeRO-1/2 shard only optimizer states and gradients, which a
  frozen teacher does not have).
* FSDP2: the teacher is cast to its dtype, moved to the device and sharded with ``fully_shard``, each of its own
  decoder layers and then its root (:func:`~distillens_trainer.distributed.fsdp.shard_teacher`), whatever the student's
  architecture; every rank runs its forward in lockstep, as under ZeRO-3.
* FSDP v1: refused, pointing to FSDP2.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from ..distributed.fsdp import FSDP_V1_REFUSAL, fsdp_version, shard_mesh, shard_teacher
from ..models.facts import freeze, hidden_size, is_partitioned
from .frozen import resolve_teacher_dtype

logger = logging.getLogger(__name__)

_HIDDEN_SIZE_KEYS: tuple[str, ...] = (
    "reduce_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
)


# --------------------------------------------------------------------------------------------- detection
def _deepspeed_plugin(accelerator: Any) -> Any | None:
    state = getattr(accelerator, "state", None)
    return getattr(state, "deepspeed_plugin", None) if state is not None else None


def deepspeed_config_of(accelerator: Any) -> dict[str, Any] | None:
    """The run's DeepSpeed config (dict), from the accelerator's plugin or HF's global one; None without DeepSpeed."""
    plugin = _deepspeed_plugin(accelerator)
    if plugin is not None:
        return plugin.deepspeed_config
    if accelerator is not None:  # an accelerator without a DeepSpeed plugin: DeepSpeed is off for this run
        return None
    from transformers.integrations.deepspeed import deepspeed_config

    return deepspeed_config()


def is_zero3_enabled(accelerator: Any) -> bool:
    """True when the run partitions parameters with DeepSpeed ZeRO stage 3."""
    plugin = _deepspeed_plugin(accelerator)
    if plugin is not None:
        return int(plugin.zero_stage) == 3
    if accelerator is not None:
        return False
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


# --------------------------------------------------------------------------------------------- ZeRO-3 config
def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == "auto"


def _drop_auto(config: dict[str, Any]) -> dict[str, Any]:
    """Remove every key still set to "auto" (DeepSpeed then uses its default)."""
    out = {}
    for key, value in config.items():
        if _is_auto(value):
            continue
        out[key] = _drop_auto(value) if isinstance(value, dict) else value
    return out


def teacher_zero3_config(
    ds_config: dict[str, Any],
    teacher: nn.Module,
    dtype: torch.dtype | None,
    *,
    micro_batch_size: int = 1,
    gradient_accumulation_steps: int = 1,
    world_size: int = 1,
) -> dict[str, Any]:
    """An inference-only ZeRO-3 config for the teacher, derived from the training run's config.

    A deep copy: the student's config is never modified. The optimizer and scheduler are removed, the
    stage stays 3, ``"auto"`` bucket sizes are filled from the teacher's hidden size as the HF Trainer
    does for the student (``reduce_bucket_size`` h², ``stage3_prefetch_bucket_size`` 0.9·h²,
    ``stage3_param_persistence_threshold`` 10·h; explicit values are kept), and bf16/fp16 are enabled
    to match ``dtype`` so DeepSpeed keeps the teacher in its dtype. Values still ``"auto"`` are dropped.
    """
    config = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = 3
    width = hidden_size(teacher)
    if width is not None:
        defaults = {
            "reduce_bucket_size": width * width,
            "stage3_prefetch_bucket_size": int(0.9 * width * width),
            "stage3_param_persistence_threshold": 10 * width,
        }
        for key in _HIDDEN_SIZE_KEYS:
            if _is_auto(zero.get(key)):
                zero[key] = defaults[key]
    # Batch sizes are only checked by DeepSpeed (there is no optimizer step); make them consistent.
    if _is_auto(config.get("train_micro_batch_size_per_gpu")):
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
    if _is_auto(config.get("gradient_accumulation_steps")):
        config["gradient_accumulation_steps"] = gradient_accumulation_steps
    if _is_auto(config.get("train_batch_size")):
        config["train_batch_size"] = (
            int(config["train_micro_batch_size_per_gpu"])
            * int(config["gradient_accumulation_steps"])
            * world_size
        )
    if dtype is not None:
        for key, enabled in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
            section = config.get(key)
            config[key] = {**(section if isinstance(section, dict) else {}), "enabled": enabled}
    return _drop_auto(config)


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _param_dtype(module: nn.Module) -> torch.dtype | None:
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def wrap_teacher_zero3(
    teacher: nn.Module, ds_config: dict[str, Any], dtype: torch.dtype | None, trainer_args: Any
) -> nn.Module:
    """The frozen teacher (see :func:`prepare_teacher`) as a ZeRO-3 DeepSpeed engine (partitioned parameters,
    no optimizer), in eval mode."""
    import deepspeed

    # Loaded under zero.Init (from_pretrained while ZeRO-3 is on): already sharded, in zero.Init's dtype.
    if is_partitioned(teacher):
        current = _param_dtype(teacher)
        if dtype is not None and current is not None and current != dtype and _is_main_process():
            logger.warning(
                "teacher_dtype %s is not applied under ZeRO-3: the teacher was loaded already partitioned "
                "(zero.Init) in %s, the DeepSpeed config's precision, and runs in %s. Pass a teacher model "
                "loaded in %s before the training arguments to keep that dtype.",
                dtype,
                current,
                current,
                dtype,
            )
        dtype = current
    elif dtype is not None:
        teacher = teacher.to(dtype=dtype)
    else:
        dtype = _param_dtype(teacher)
    config = teacher_zero3_config(
        ds_config,
        teacher,
        dtype,
        micro_batch_size=getattr(trainer_args, "per_device_train_batch_size", 1),
        gradient_accumulation_steps=getattr(trainer_args, "gradient_accumulation_steps", 1),
        world_size=getattr(trainer_args, "world_size", 1),
    )
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


# --------------------------------------------------------------------------------------------- entry point
def prepare_teacher(teacher: nn.Module, trainer_args: Any, accelerator: Any = None) -> nn.Module:
    """The frozen teacher, placed for this run.

    Args:
        teacher: the teacher causal LM (possibly already partitioned by ``deepspeed.zero.Init``).
        trainer_args: the ``DistillLensConfig`` (``teacher_dtype``, ``bf16``, ``fp16``, ``device``, ``fsdp``).
        accelerator: the Trainer's ``Accelerator`` (None: read HF's global DeepSpeed config); its
            ``mixed_precision`` counts as ``bf16`` / ``fp16`` for ``teacher_dtype="auto"``.
    Returns:
        Under ZeRO-3, a DeepSpeed engine wrapping the teacher (``.module`` is the model), partitioned across
        ranks, with no optimizer, in eval mode. Otherwise the teacher itself, frozen, in eval mode, on
        ``trainer_args.device`` and in the resolved teacher dtype; under FSDP2 also sharded with ``fully_shard``.
    """
    fsdp = fsdp_version(trainer_args, accelerator)
    if fsdp == 1:
        raise ValueError(FSDP_V1_REFUSAL)
    teacher = freeze(teacher)  # the one place the teacher is frozen on its way into training
    precision = str(
        getattr(accelerator, "mixed_precision", "no")
    )  # also an accelerate config's mixed_precision
    dtype = resolve_teacher_dtype(
        getattr(trainer_args, "teacher_dtype", "auto"),
        bf16=bool(getattr(trainer_args, "bf16", False)) or precision == "bf16",
        fp16=bool(getattr(trainer_args, "fp16", False)) or precision == "fp16",
    )
    if is_zero3_enabled(accelerator):
        ds_config = deepspeed_config_of(accelerator)
        if ds_config is None:
            raise ValueError(
                "DeepSpeed ZeRO-3 is enabled but its config could not be found on the accelerator."
            )
        return wrap_teacher_zero3(teacher, ds_config, dtype, trainer_args)
    if is_partitioned(teacher):
        raise ValueError(
            "the teacher's weights are partitioned by DeepSpeed ZeRO-3 (created under zero.Init) but this run does "
            "not use ZeRO-3: load the teacher outside ZeRO-3, or train with a ZeRO-3 DeepSpeed config."
        )
    device = getattr(trainer_args, "device", None)
    if dtype is not None:
        teacher = teacher.to(device=device, dtype=dtype)
    elif device is not None:
        teacher = teacher.to(device)
    if fsdp == 2:
        mesh = shard_mesh(accelerator, next(teacher.parameters()).device)
        teacher, num_layers = shard_teacher(teacher, mesh)
        logger.info(
            "FSDP2: the teacher is sharded across ranks (%d decoder layers, then its root).", num_layers
        )
    return teacher
