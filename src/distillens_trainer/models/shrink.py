"""A depth-pruned student cut from a teacher (DistilBERT, Minitron, Sheared-LLaMA style); the command is
``distillens shrink`` (:mod:`distillens_trainer.commands.shrink`).

The student keeps a subset of the teacher's blocks, in order, with the teacher's embeddings, final norm and
LM head, so it shares the teacher's tokenizer and starts close to it. The kept block indices (0-based,
teacher numbering) are recorded in the config under ``distillens_kept_layers``; ``lens_layer_map='shrunk'``
pairs each student block with the teacher block it came from.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from ..loss.layer_map import KEPT_LAYERS_CONFIG_KEY

# model_type -> dotted path, from the *ForCausalLM model, of the ModuleList of transformer blocks
BLOCK_PATHS: dict[str, str] = {
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3"),
        "model.layers",
    ),
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}
# config attributes holding one entry per block, cut along with the blocks
PER_LAYER_CONFIG_LISTS: tuple[str, ...] = ("layer_types", "no_rope_layers")


def evenly_spaced_layers(num_layers: int, num_kept: int) -> list[int]:
    """``num_kept`` block indices spread evenly over ``0..num_layers-1``, the first and the last included.

    Positions round half up: 30 blocks, 10 kept -> 0, 3, 6, 10, 13, 16, 19, 23, 26, 29.
    """
    if not 2 <= num_kept <= num_layers:
        raise ValueError(
            f"num_layers={num_kept} must lie in 2..{num_layers} (the teacher's block count) to keep the first "
            "and the last block; pass --keep_layers for a single block."
        )
    span = num_layers - 1
    return [(2 * i * span + num_kept - 1) // (2 * (num_kept - 1)) for i in range(num_kept)]


def check_keep_layers(keep_layers: Sequence[int], num_layers: int) -> list[int]:
    """``keep_layers`` as a list, or ValueError unless it is non-empty, increasing and within the model."""
    keep_layers = list(keep_layers)
    if not keep_layers:
        raise ValueError("keep_layers is empty: give at least one block index.")
    for index in keep_layers:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_layers:
            raise ValueError(
                f"keep_layers holds {index!r}, but the model has {num_layers} blocks: use indices in "
                f"0..{num_layers - 1} (0 is the first block)."
            )
    if any(later <= earlier for earlier, later in pairwise(keep_layers)):
        raise ValueError(
            f"keep_layers={keep_layers} must be strictly increasing: list each block once, in order."
        )
    return keep_layers


def block_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent module, attribute name, ModuleList) of the model's transformer blocks; ValueError if unknown."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in BLOCK_PATHS:
        raise ValueError(
            f"model_type {model_type!r} cannot be cut: distillens shrink supports {', '.join(sorted(BLOCK_PATHS))} "
            "causal LMs."
        )
    *parent_path, name = BLOCK_PATHS[model_type].split(".")
    parent = model
    for attribute in parent_path:
        parent = getattr(parent, attribute, None)
    blocks = getattr(parent, name, None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no {BLOCK_PATHS[model_type]} block list: load the model with its "
            "*ForCausalLM class (e.g. through AutoModelForCausalLM)."
        )
    return parent, name, blocks


def _renumber_blocks(blocks: nn.ModuleList) -> None:
    """Set every ``layer_idx`` inside block k to k, so the KV cache indexes the shrunk stack correctly."""
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index


def shrink_model(model: PreTrainedModel, keep_layers: Sequence[int]) -> PreTrainedModel:
    """A copy of ``model`` with only the blocks ``keep_layers`` (0-based, increasing); ``model`` is untouched.

    Embeddings, final norm and LM head are the model's own (tied weights stay tied); per-block config lists
    (``layer_types``, ...) are cut the same way; the kept indices go in ``config.distillens_kept_layers``.
    The copy is trainable (``requires_grad``) even when ``model`` is a frozen teacher.
    """
    _, _, blocks = block_list(model)
    keep_layers = check_keep_layers(keep_layers, len(blocks))
    shrunk = copy.deepcopy(model)
    parent, name, shrunk_blocks = block_list(shrunk)
    kept_blocks = nn.ModuleList([shrunk_blocks[index] for index in keep_layers])
    _renumber_blocks(kept_blocks)
    setattr(parent, name, kept_blocks)
    config = shrunk.config
    num_layers = len(blocks)
    for attribute in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, attribute, None)
        if isinstance(values, list | tuple) and len(values) == num_layers:
            setattr(config, attribute, [values[index] for index in keep_layers])
    config.num_hidden_layers = len(keep_layers)
    setattr(config, KEPT_LAYERS_CONFIG_KEY, keep_layers)
    return shrunk.requires_grad_(True)


def recorded_kept_layers(config: Any) -> list[int] | None:
    """The teacher blocks (0-based) a student was cut from, as ``shrink_model`` recorded them in its config
    (``distillens_kept_layers``); None for a model not written by ``distillens shrink``."""
    kept = getattr(config, KEPT_LAYERS_CONFIG_KEY, None)
    return None if kept is None else list(kept)
