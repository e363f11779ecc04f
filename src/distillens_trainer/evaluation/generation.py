"""Batched generation with one set of generation settings (the paper's protocol by default)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import transformers
from transformers import GenerationConfig

from ..models.facts import check_fits_context, resolve_pad_token_id, tokenizer_adds_bos, truncate_left
from ..progress import track


@dataclass(frozen=True)
class GenerationSettings:
    """How responses are generated, parseable with `transformers.HfArgumentParser`; the defaults are the paper's
    protocol (MiniLLM): sampling at temperature 1.0, top-p 1.0, top-k 0 (disabled), no-repeat-ngram 6,
    256 new tokens, prompts cut to their last 256 tokens.

    The one place these settings and their checks live: ``distillens eval`` parses one alongside
    :class:`EvalArguments`, :class:`RougeEvalCallback` holds one (greedy by default),
    :func:`generate_responses` takes one.
    """

    do_sample: bool = field(
        default=True, metadata={"help": "Sample (paper protocol); pass --no_do_sample for greedy decoding."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1]; 1.0 disables it."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (>= 0); 0 disables it."})
    no_repeat_ngram_size: int = field(
        default=6, metadata={"help": "Forbid repeating n-grams of this size (>= 0); 0 disables it."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Maximum number of generated tokens."})
    max_prompt_length: int = field(
        default=256, metadata={"help": "Prompts longer than this many tokens keep only their last tokens."}
    )
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate() call."})

    def __post_init__(self) -> None:
        """ValueError naming the field (and its command-line flag) when a value is out of range."""
        require(self.temperature > 0, "temperature", "> 0")
        require(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        require(self.top_k >= 0, "top_k", ">= 0 (0 disables top-k)")
        require(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", ">= 0 (0 disables it)")
        require(self.max_new_tokens >= 1, "max_new_tokens", ">= 1")
        require(self.max_prompt_length >= 1, "max_prompt_length", ">= 1")
        require(self.batch_size >= 1, "batch_size", ">= 1")

    def with_overrides(self, **overrides: Any) -> GenerationSettings:
        """A copy with some fields replaced (unknown names raise TypeError, as for a bad keyword argument)."""
        return replace(self, **overrides) if overrides else self


def require(condition: bool, name: str, expectation: str) -> None:
    """Raise a one-line ValueError naming the field when a numeric constraint fails."""
    if not condition:
        raise ValueError(f"{name}: must be {expectation}; fix the value passed for --{name}")


def eos_token_ids(model: Any, tokenizer: Any | None) -> list[int]:
    """EOS ids from the model's generation config plus the tokenizer's EOS (if any), in a stable order."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = []
    elif isinstance(configured, int):
        configured = [configured]
    ids = list(configured)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos not in ids:
        ids.append(eos)
    return ids


def encode_prompt(tokenizer: Any, prompt: str, add_bos: bool) -> list[int]:
    """Prompt ids as training sees them: no special tokens, plus BOS in front when `add_bos` and absent."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    return [bos, *ids] if add_bos and bos is not None and ids[:1] != [bos] else ids


def left_pad(batch: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a batch of id lists to a rectangle; returns (input_ids, attention_mask)."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def cut_at_eos(ids: Iterable[int], eos_ids: Iterable[int]) -> list[int]:
    """The ids before the first EOS token."""
    stop = set(eos_ids)
    kept: list[int] = []
    for token in ids:
        if token in stop:
            break
        kept.append(token)
    return kept


def build_generation_config(
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    top_k: int,
    no_repeat_ngram_size: int,
    pad_token_id: int,
    eos_token_id: list[int],
    bos_token_id: int | None = None,
) -> GenerationConfig:
    """A clean generation config holding the protocol's values and the special-token ids, nothing else.

    :func:`generate_responses` also installs it as the model's ``generation_config`` while generating, because
    ``generate`` fills every unset field from the model's own (a checkpoint's ``min_new_tokens``, ``min_p``,
    ``typical_p``, ... would otherwise add logits processors the protocol does not have).
    """
    settings: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "num_beams": 1,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": no_repeat_ngram_size,
        "pad_token_id": pad_token_id,
        "eos_token_id": eos_token_id,
        "bos_token_id": bos_token_id,
    }
    if do_sample:
        settings.update(temperature=temperature, top_p=top_p, top_k=top_k)
    return GenerationConfig(**settings)


@contextlib.contextmanager
def only_generation_config(model: Any, config: GenerationConfig) -> Iterator[None]:
    """Within the block, `config` is the ``generation_config`` of `model` and of every module inside it (PEFT)."""
    owners = [
        module
        for module in model.modules()
        if isinstance(getattr(module, "generation_config", None), GenerationConfig)
    ]
    saved = [owner.generation_config for owner in owners]
    for owner in owners:
        owner.generation_config = config
    try:
        yield
    finally:
        for owner, original in zip(owners, saved):
            owner.generation_config = original


def _synced_gpus() -> bool:
    """True under multi-process DeepSpeed ZeRO-3, where every rank must run each forward pass."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return bool(is_deepspeed_zero3_enabled()) and world_size > 1


def _model_device(model: Any) -> torch.device:
    """The device inputs must be placed on."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: GenerationSettings | None = None,
    *,
    seed: int = 10,
    show_progress: bool = True,
    **overrides: Any,
) -> list[str]:
    """Generate one response per prompt, returned in the order of `prompts`, with `settings` (default: the
    paper's protocol) where the keyword `overrides` (field names of :class:`GenerationSettings`) replace fields.

    Prompts are tokenised like training prompts (BOS only where the tokenizer adds one),
    left-truncated to `max_prompt_length` tokens, sorted longest-first and left-padded into batches;
    the tokenizer itself is not modified. The pad id falls back to EOS. Only new tokens up to the first EOS are decoded, with special tokens
    skipped and surrounding whitespace stripped. The RNG is seeded with `seed` before the first
    batch, so results are reproducible for a fixed batch size (greedy results do not depend on it).
    Under multi-process DeepSpeed ZeRO-3 every rank must call this with the same prompts.
    """
    settings = (settings or GenerationSettings()).with_overrides(**overrides)
    if not prompts:
        return []
    pad_id = resolve_pad_token_id(tokenizer)
    eos_ids = eos_token_ids(model, tokenizer)
    config = build_generation_config(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        bos_token_id=tokenizer.bos_token_id,
    )
    add_bos = tokenizer_adds_bos(tokenizer)
    encoded = [
        truncate_left(
            encode_prompt(tokenizer, p, add_bos), settings.max_prompt_length, tokenizer.bos_token_id
        )
        for p in prompts
    ]
    longest = max(len(ids) for ids in encoded)
    check_fits_context(
        longest + settings.max_new_tokens,
        model.config,
        model="model",
        setting=f"a prompt of {longest} tokens plus max_new_tokens={settings.max_new_tokens}",
        fix="lower max_prompt_length or max_new_tokens so that they sum to at most {limit}",
    )
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    device = _model_device(model)
    synced_gpus = _synced_gpus()
    responses: list[str] = [""] * len(prompts)

    transformers.set_seed(seed)
    was_training = model.training
    model.eval()
    batch_size = settings.batch_size
    starts = range(0, len(order), batch_size)
    try:
        with torch.inference_mode(), only_generation_config(model, config):
            batches = [order[start : start + batch_size] for start in starts]
            for indices in track(
                batches,
                len(order),
                f"generate (seed {seed})",
                size=len,
                unit="prompts",
                enabled=show_progress,
            ):
                input_ids, attention_mask = left_pad([encoded[i] for i in indices], pad_id)
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                    synced_gpus=synced_gpus,
                )
                new_tokens = output[:, input_ids.shape[1] :].tolist()
                for index, ids in zip(indices, new_tokens):
                    text = tokenizer.decode(cut_at_eos(ids, eos_ids), skip_special_tokens=True)
                    responses[index] = text.strip()
    finally:
        model.train(was_training)
    return responses
