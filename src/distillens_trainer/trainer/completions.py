"""Sampling completions during training (on-policy and ``seq_kd`` windows): the model in generation mode, and
``generate`` over a window's prompts in batches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from ..config import DistillLensConfig
from ..distributed.fsdp import is_fsdp_module
from ..evaluation.generation import (
    build_generation_config,
    eos_token_ids,
    left_pad,
    only_generation_config,
)
from ..models.facts import context_length, is_partitioned, unwrap_model


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled: untruncated sampling at temperature 1 by default (what makes them on-policy).

    Attributes:
        max_new_tokens: most tokens per completion.
        temperature / top_p / top_k: the sampling distribution (``top_k`` 0 and ``top_p`` 1 are off).
        pad_token_id: the id prompts are left-padded with.
        eos_token_ids: ids that end a completion (generation stops there).
        batch_size: prompts per ``generate`` call.
    """

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    pad_token_id: int
    eos_token_ids: tuple[int, ...]
    batch_size: int

    def generation_config(self) -> GenerationConfig:
        """A clean ``GenerationConfig`` holding these values only: a checkpoint's own generation defaults
        (``repetition_penalty``, ``suppress_tokens``, ``min_new_tokens``, ...) must not bend the student's samples."""
        config = build_generation_config(
            max_new_tokens=self.max_new_tokens,
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            no_repeat_ngram_size=0,
            pad_token_id=self.pad_token_id,
            eos_token_id=list(self.eos_token_ids),
        )
        config.use_cache = True  # the KV cache, stated rather than left to the model's defaults
        return config


def sampling_settings(
    args: DistillLensConfig,
    model: nn.Module,
    tokenizer: Any,
    *,
    has_teacher: bool,
    train_columns: Sequence[str] = (),
) -> SamplingSettings:
    """How a run that generates completions (``lmbda > 0`` or ``seq_kd``) samples them, checked once before
    training: a teacher for ``seq_kd``, an EOS token, and responses in the data unless every window is on-policy.

    ``train_columns`` are the training dataset's column names (empty when unknown, e.g. an iterable dataset).
    """
    if args.seq_kd and not has_teacher:
        raise ValueError("seq_kd=True samples completions from the teacher: pass teacher_model=... as well.")
    module = unwrap_model(model)
    eos_ids = tuple(eos_token_ids(module, tokenizer))
    if not eos_ids:
        raise ValueError(
            "lmbda > 0 (or seq_kd) samples completions that end at the EOS token, but the tokenizer has none: "
            "set tokenizer.eos_token (and pass the tokenizer as processing_class)."
        )
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(module, "generation_config", None), "pad_token_id", None)
    if args.lmbda < 1 and not args.seq_kd and train_columns and "labels" not in train_columns:
        raise ValueError(
            f"the training data has no labels (prompt-only rows), so the off-policy windows of lmbda={args.lmbda} "
            "have nothing to train on: set lmbda=1 (every window on-policy) or seq_kd=True."
        )
    return SamplingSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.generation_temperature,
        top_p=args.generation_top_p,
        top_k=args.generation_top_k,
        pad_token_id=eos_ids[0] if pad is None else pad,
        eos_token_ids=eos_ids,
        batch_size=args.per_device_train_batch_size,
    )


def check_room_for_completions(
    model: nn.Module, prompts: Sequence[torch.Tensor], max_new_tokens: int
) -> None:
    """Refuses prompts ``[P_i]`` whose longest plus ``max_new_tokens`` exceeds the model's context, in one line."""
    limit = context_length(unwrap_model(model).config)
    longest = max(len(prompt) for prompt in prompts)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the student's context of "
            f"{limit} positions: lower max_new_tokens or max_prompt_length."
        )


@contextlib.contextmanager
def generation_mode(
    model: nn.Module, checkpointing_kwargs: dict | None = None
) -> Iterator[tuple[nn.Module, bool]]:
    """The causal LM inside ``model`` ready to ``generate``: eval mode, no gradients, gradient checkpointing off,
    and under ZeRO-3 its parameters gathered once for the whole block; everything is restored after (gradient
    checkpointing with ``checkpointing_kwargs``, the Trainer's ``gradient_checkpointing_kwargs``).

    Yields ``(module, synced_gpus)``: pass ``synced_gpus`` to ``generate`` so ranks stay in step under ZeRO-3 and
    FSDP2 (whose forwards gather layer by layer on every rank).
    """
    module = unwrap_model(model)
    was_training = module.training
    checkpointing = _activation_checkpointing(module)
    partitioned = is_partitioned(module)
    sharded = partitioned or any(is_fsdp_module(sub) for sub in module.modules())  # ZeRO-3 or FSDP2
    gathered: contextlib.AbstractContextManager = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    if checkpointing:
        _set_activation_checkpointing(module, False)
    module.eval()
    try:
        with torch.no_grad(), gathered:
            yield module, sharded
    finally:
        module.train(was_training)
        if checkpointing:
            _set_activation_checkpointing(module, True, checkpointing_kwargs)


def sample_completions(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    settings: SamplingSettings,
    checkpointing_kwargs: dict | None = None,
    seed: int | None = None,
) -> list[torch.Tensor]:
    """``model``'s sampled continuation of each prompt ``[P_i]``: its ``[max_new_tokens]`` generated tokens (a row
    that ended early is padded after its EOS). Prompts are generated ``settings.batch_size`` at a time
    (left-padded, KV cache on). With a ``seed`` the sampling draws from its own random stream, and the caller's
    random state (dropout, data order) is left as it was."""
    completions: list[torch.Tensor] = []
    config = settings.generation_config()
    with (
        generation_mode(model, checkpointing_kwargs) as (module, synced_gpus),
        _own_random_stream(module, seed),
        only_generation_config(module, config),
    ):
        device = next(module.parameters()).device
        for start in range(0, len(prompts), settings.batch_size):
            chunk = [prompt.tolist() for prompt in prompts[start : start + settings.batch_size]]
            input_ids, attention_mask = (t.to(device) for t in left_pad(chunk, settings.pad_token_id))
            output = module.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                synced_gpus=synced_gpus,
            )
            completions.extend(output[:, input_ids.shape[1] :])
    return completions


@contextlib.contextmanager
def _own_random_stream(module: nn.Module, seed: int | None) -> Iterator[None]:
    """Inside: torch's random state seeded with ``seed`` (on the CPU and the module's CUDA device); after: as before."""
    if seed is None:
        yield
        return
    device = next(module.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _activation_checkpointing(module: nn.Module) -> bool:
    """Whether the model recomputes activations in backward (transformers 5's name, else the older one)."""
    if hasattr(type(module), "is_activation_checkpointing"):
        return bool(module.is_activation_checkpointing)
    return bool(getattr(module, "is_gradient_checkpointing", False))


def _set_activation_checkpointing(module: nn.Module, on: bool, kwargs: dict | None = None) -> None:
    if hasattr(module, "activation_checkpointing_enable"):
        if on:
            module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            module.activation_checkpointing_disable()
    elif on:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        module.gradient_checkpointing_disable()
