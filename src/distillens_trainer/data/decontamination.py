"""Decontamination: drop training rows whose prompt also appears in an evaluation set.

Prompts are compared after :func:`normalize_prompt` (case and whitespace folded), on the formatted prompt, so
instruction *and* input must match: the same instruction with another context is a different prompt.
"""

from __future__ import annotations

from collections.abc import Iterable

import datasets


def normalize_prompt(text: str) -> str:
    """Lowercase, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.lower().split())


def prompt_set(prompts: Iterable[str]) -> set[str]:
    """The normalised forms of `prompts`."""
    return {normalize_prompt(prompt) for prompt in prompts}


def drop_contaminated(
    dataset: datasets.Dataset, evaluation_prompts: set[str], column: str = "prompt"
) -> tuple[datasets.Dataset, int]:
    """(`dataset` without the rows whose normalised `column` is in `evaluation_prompts`, number dropped)."""
    kept = [
        i for i, prompt in enumerate(dataset[column]) if normalize_prompt(prompt) not in evaluation_prompts
    ]
    if len(kept) == len(dataset):
        return dataset, 0
    return dataset.select(kept), len(dataset) - len(kept)
