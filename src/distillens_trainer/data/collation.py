"""Padding a batch of tokenised examples for training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..models.facts import IGNORE_INDEX, resolve_pad_token_id


def _as_list(values: Any) -> list[int]:
    """A token sequence (list or tensor) as a list of ints."""
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def _pad(sequence: list[int], length: int, value: int, side: str) -> list[int]:
    """`sequence` padded with `value` to `length`, on the right or left."""
    padding = [value] * (length - len(sequence))
    return sequence + padding if side == "right" else padding + sequence


@dataclass
class DataCollatorForCompletionOnly:
    """Pad ``input_ids``, ``attention_mask`` and ``labels`` into LongTensors of shape (batch, seq).

    ``input_ids`` are padded with `pad_token_id` (default: the tokenizer's pad id, else its EOS id),
    ``attention_mask`` with 0 and ``labels`` with :data:`IGNORE_INDEX`; ``seq`` is the longest example rounded
    up to `pad_to_multiple_of`. Other keys of the features are dropped.
    """

    tokenizer: Any = None
    pad_token_id: int | None = None
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            self.pad_token_id = resolve_pad_token_id(self.tokenizer)
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(
                f"pad_to_multiple_of must be a positive integer or None, got {self.pad_to_multiple_of}."
            )

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DataCollatorForCompletionOnly got an empty batch.")
        for key in ("input_ids", "attention_mask", "labels"):
            if key not in features[0]:
                raise ValueError(
                    f"Features need {key!r} (found {sorted(features[0])}); tokenise the data first."
                )
        longest = max(len(feature["input_ids"]) for feature in features)
        length = longest
        if self.pad_to_multiple_of:
            length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor(
                [_pad(_as_list(feature[key]), length, value, self.padding_side) for feature in features],
                dtype=torch.long,
            )
            for key, value in pad_values.items()
        }
