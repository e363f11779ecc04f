"""What a model's config says it can take, read before any weights: its context length.

``distillens train`` and ``distillens eval`` check their length settings against it before they tokenise,
load weights or generate, so a too-long setting ends in one line instead of an ``IndexError`` from the
position embedding.
"""

from __future__ import annotations

from typing import Any

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
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
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
