"""Facts about a causal LM and its tokenizer, read in one place: unwrapping, config, sizes, dtypes, padding, BOS,
the context length, and the logit post-processing its config asks for.

Every other module asks these helpers instead of reading ``model.config`` or a tokenizer's special ids itself.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

# Label of a token that is not trained on (prompt tokens, padding): the ``ignore_index`` of the CE loss.
IGNORE_INDEX = -100

# The dtype names every command accepts, and what they load as ("auto": the checkpoint's own dtype).
DTYPES: dict[str, str | torch.dtype] = {
    "auto": "auto",
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
DTYPE_NAMES: tuple[str, ...] = tuple(DTYPES)


def check_dtype_name(field: str, name: str) -> None:
    """ValueError naming ``field`` when ``name`` is not one of :data:`DTYPE_NAMES`."""
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r} must be one of {', '.join(DTYPE_NAMES)}.")


def torch_dtype(name: str) -> str | torch.dtype:
    """The ``from_pretrained`` dtype for a name in :data:`DTYPE_NAMES` (``"auto"`` stays ``"auto"``)."""
    return DTYPES[name]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The causal-LM module inside DDP/DeepSpeed (``.module``), torch.compile and PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeed engine
            model = model.module
    return model


def text_config(config: Any) -> Any:
    """The text part of a model config (multimodal configs nest it), or the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_num_layers(config: Any) -> int:
    """Number of transformer blocks named by a model config (its text config for multimodal models)."""
    config = text_config(config)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot read the number of layers from {type(config).__name__}.")


def num_hidden_layers(model: nn.Module) -> int:
    """Number of transformer blocks, i.e. the last ``hidden_states`` index."""
    return config_num_layers(unwrap_model(model).config)


def hidden_size(model: nn.Module) -> int | None:
    """Width of the residual stream (the widest stage for staged models), or None when the config has none."""
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return None
    config = text_config(config)
    hidden_sizes = getattr(config, "hidden_sizes", None)
    if hidden_sizes:
        return int(max(hidden_sizes))
    value = getattr(config, "hidden_size", None)
    return int(value) if isinstance(value, int) else None


def model_vocab_size(model: nn.Module) -> int:
    """Rows of the LM head, i.e. the logits' last dimension (padded vocabularies included)."""
    head = unwrap_model(model).get_output_embeddings()
    weight = getattr(head, "weight", None)
    shape = getattr(weight, "ds_shape", None) or getattr(
        weight, "shape", None
    )  # ds_shape: ZeRO-3 partitioned
    if shape is not None and len(shape) == 2 and shape[0] > 0:
        return int(shape[0])
    return int(text_config(unwrap_model(model).config).vocab_size)


def is_partitioned(module: nn.Module) -> bool:
    """True when some parameter of ``module`` is a ZeRO-3 partitioned parameter."""
    return any(hasattr(param, "ds_id") for param in module.parameters())


def module_class(module: nn.Module) -> type:
    """The module's own class, behind the subclass FSDP2's ``fully_shard`` gives a sharded module
    (``FSDPLinear`` -> ``nn.Linear``)."""
    cls = type(module)
    if any(base.__name__ == "FSDPModule" for base in cls.__mro__[1:]):
        return next(base for base in cls.__bases__ if base.__name__ != "FSDPModule")
    return cls


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients, in place."""
    model.eval()
    model.requires_grad_(False)
    return model


def resolve_pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to its EOS id (GPT-2 has no pad token)."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    raise ValueError(
        "Cannot pad: the tokenizer has neither pad_token nor eos_token; set tokenizer.pad_token "
        "or pass pad_token_id to DataCollatorForCompletionOnly."
    )


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether `tokenizer` puts BOS in front of plain text when adding special tokens (Llama: yes, GPT-2: no)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]


def truncate_left(ids: list[int], max_length: int, bos_token_id: int | None = None) -> list[int]:
    """Keep the last `max_length` ids; a leading BOS token is preserved in front of the kept tail."""
    if len(ids) <= max_length:
        return ids
    if bos_token_id is not None and ids[0] == bos_token_id:
        return [ids[0], *ids[len(ids) - max_length + 1 :]]
    return ids[len(ids) - max_length :]


def forward_accepts(model: nn.Module, argument: str) -> bool:
    """True when the model's forward takes ``argument`` by name."""
    return argument in inspect.signature(unwrap_model(model).forward).parameters


def with_position_ids(inputs: dict[str, Any], accepts_position_ids: bool) -> dict[str, Any]:
    """Position ids counted over real tokens, so left padding does not shift a sample's positions."""
    if not accepts_position_ids or "position_ids" in inputs or inputs.get("attention_mask") is None:
        return inputs
    attention_mask = inputs["attention_mask"]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # [B, T]
    return {**inputs, "position_ids": position_ids}


# --------------------------------------------------------------------------------------------- context length
# Config attributes that hold the number of positions, most common first (GPT-2 maps n_positions itself).
_CONTEXT_ATTRIBUTES: tuple[str, ...] = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
)


def context_length(config: Any) -> int | None:
    """Positions the model can attend over (its text config's), or None when the config does not say."""
    config = text_config(config)
    for name in _CONTEXT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_fits_context(length: int, config: Any, *, model: str, setting: str, fix: str) -> None:
    """ValueError when `length` tokens (what `setting` allows) exceed the context of `model`'s `config`.

    Example message: ``--max_length (512) exceeds the student's context of 128 positions: pass
    --max_length 128 or less.``
    """
    limit = context_length(config)
    if limit is not None and length > limit:
        raise ValueError(
            f"{setting} ({length}) exceeds the {model}'s context of {limit} positions: {fix.format(limit=limit)}."
        )


def check_fits_contexts(length: int, configs: dict[str, Any], *, setting: str, fix: str) -> None:
    """:func:`check_fits_context` against several models (``{"student": config, "teacher": config}``, None
    where unknown): the one line names the tightest limit and every other model's.

    Example message: ``--max_length (256) exceeds the teacher's context of 128 positions (the student's: 512):
    pass --max_length 128 or less.``
    """
    limits = {
        name: limit for name, config in configs.items() if (limit := context_length(config)) is not None
    }
    if not limits or length <= min(limits.values()):
        return
    tightest = min(limits, key=limits.__getitem__)
    others = ", ".join(f"the {name}'s: {limit}" for name, limit in limits.items() if name != tightest)
    raise ValueError(
        f"{setting} ({length}) exceeds the {tightest}'s context of {limits[tightest]} positions"
        f"{f' ({others})' if others else ''}: {fix.format(limit=limits[tightest])}."
    )


def logit_postprocessing(model: nn.Module) -> tuple[float | None, float | None]:
    """``(scale, softcap)`` the model applies to its head's output, None where it applies none.

    ``scale`` folds Granite's division by ``logits_scaling`` and Cohere's ``logit_scale``; ``softcap`` is
    Gemma-2's ``final_logit_softcapping`` (``z = c·tanh(scale·a / c)``).
    """
    config = text_config(unwrap_model(model).config)
    scale = 1.0
    if getattr(config, "logits_scaling", None):
        scale /= config.logits_scaling
    if getattr(config, "logit_scale", None):
        scale *= config.logit_scale
    softcap = getattr(config, "final_logit_softcapping", None)
    return (None if scale == 1.0 else scale), (softcap or None)
