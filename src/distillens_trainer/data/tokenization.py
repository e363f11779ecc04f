"""Tokenisation with prompt masking: prompt + completion ids, labels, length limits."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import datasets

from ..models.facts import IGNORE_INDEX, tokenizer_adds_bos, truncate_left
from .arguments import LONG_PROMPT_STRATEGIES, check_choice, check_lengths

logger = logging.getLogger(__name__)

_HELPER_COLUMNS = ("_prompt_truncated", "_completion_truncated")


def assemble_example(
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    *,
    eos_token_id: int,
    bos_token_id: int | None,
    max_length: int,
    max_prompt_length: int,
    long_prompt_strategy: str,
) -> tuple[dict[str, list[int]], bool, bool] | None:
    """One training example from tokenised prompt and completion, or None when it is dropped.

    BOS (when given and not already there) is prepended to the prompt and EOS appended to the completion.
    A prompt over `max_prompt_length` tokens (BOS included) is dropped or, with ``"truncate_left"``, cut to
    its last tokens (BOS kept). The completion is then cut so the sequence fits `max_length`; an example with no
    completion token left is dropped. Returns ``({"input_ids", "attention_mask", "labels"}, prompt_truncated,
    completion_truncated)``; all three lists have length ``len(prompt) + len(completion)`` ≤ `max_length`.
    """
    prompt = list(prompt_ids)
    if bos_token_id is not None and prompt[:1] != [bos_token_id]:
        prompt = [bos_token_id, *prompt]
    prompt_truncated = len(prompt) > max_prompt_length
    if prompt_truncated:
        if long_prompt_strategy == "drop":
            return None
        prompt = truncate_left(prompt, max_prompt_length, bos_token_id)
    completion = [*completion_ids, eos_token_id]
    room = max_length - len(prompt)
    if room < 1:
        return None
    completion_truncated = len(completion) > room
    completion = completion[:room]
    example = {
        "input_ids": prompt + completion,
        "attention_mask": [1] * (len(prompt) + len(completion)),
        "labels": [IGNORE_INDEX] * len(prompt) + completion,
    }
    return example, prompt_truncated, completion_truncated


def split_at_prompt(prompt_ids: Sequence[int], joint_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(prompt part, response part) of the joint encoding of prompt + completion.

    The prompt part is the longest prefix `joint_ids` shares with the prompt's own encoding `prompt_ids`; the
    rest is the response. Encoding the completion on its own would differ: a SentencePiece-style tokenizer
    (Llama, Mistral) prepends a word-boundary piece (``▁The`` instead of ``The``). A token that merges the
    prompt's last characters with the response's first ones counts as response, so no response text is left
    unsupervised.
    """
    boundary = 0
    for prompt_id, joint_id in zip(prompt_ids, joint_ids):
        if prompt_id != joint_id:
            break
        boundary += 1
    return list(joint_ids[:boundary]), list(joint_ids[boundary:])


def _tokenize_batch(batch: dict[str, list[Any]], *, tokenizer: Any, **limits: Any) -> dict[str, list[Any]]:
    """Batched map body of :func:`tokenize_prompt_completion`; returns only the kept rows."""
    prompt_ids = tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]
    joint_texts = [prompt + completion for prompt, completion in zip(batch["prompt"], batch["completion"])]
    joint_ids = tokenizer(joint_texts, add_special_tokens=False)["input_ids"]
    out: dict[str, list[Any]] = {
        name: [] for name in ("input_ids", "attention_mask", "labels", *_HELPER_COLUMNS)
    }
    for prompt_only, joint in zip(prompt_ids, joint_ids):
        prompt, completion = split_at_prompt(prompt_only, joint)
        assembled = assemble_example(prompt, completion, **limits)
        if assembled is None:
            continue
        example, prompt_truncated, completion_truncated = assembled
        for name, values in example.items():
            out[name].append(values)
        out["_prompt_truncated"].append(prompt_truncated)
        out["_completion_truncated"].append(completion_truncated)
    return out


def tokenize_prompt_completion(
    dataset: datasets.Dataset,
    tokenizer: Any,
    max_length: int = 512,
    max_prompt_length: int = 256,
    long_prompt_strategy: str = "drop",
    *,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, int]:
    """Tokenise ``prompt``/``completion`` text into ``input_ids``, ``attention_mask`` and ``labels``.

    Prompt + completion are tokenised as one text without special tokens and split where the encoding stops
    matching the prompt's own (:func:`split_at_prompt`), so the response tokens are those the model sees in the
    full text; BOS is prepended when the tokenizer adds one to plain text and EOS is always appended. ``labels`` copies the completion
    tokens and holds :data:`IGNORE_INDEX` over the prompt. Length rules are those of :func:`assemble_example`.
    Returns the tokenised dataset (only those three columns) and the number of dropped examples.
    """
    check_choice("long_prompt_strategy", long_prompt_strategy, LONG_PROMPT_STRATEGIES)
    check_lengths(max_length, max_prompt_length)
    missing = [name for name in ("prompt", "completion") if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"tokenize_prompt_completion needs columns 'prompt' and 'completion', missing {missing}; "
            "run to_prompt_completion first."
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos_token; set tokenizer.eos_token so responses can end.")
    limits = {
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "long_prompt_strategy": long_prompt_strategy,
    }
    tokenized = dataset.map(
        partial(_tokenize_batch, tokenizer=tokenizer, **limits),
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc="Tokenising prompt/completion",
    )
    n_dropped = len(dataset) - len(tokenized)
    if len(tokenized) == 0:
        raise ValueError(_empty_dataset_message(len(dataset), max_prompt_length))
    n_prompt_truncated = sum(tokenized["_prompt_truncated"])
    n_completion_truncated = sum(tokenized["_completion_truncated"])
    tokenized = tokenized.remove_columns(list(_HELPER_COLUMNS))
    _log_length_filtering(len(dataset), n_dropped, n_prompt_truncated, n_completion_truncated, limits)
    return tokenized, n_dropped


def _log_length_filtering(
    n_rows: int,
    n_dropped: int,
    n_prompt_truncated: int,
    n_completion_truncated: int,
    limits: Mapping[str, Any],
) -> None:
    """Log how many of `n_rows` examples the length limits dropped or truncated."""
    if n_dropped:
        logger.warning(
            "Dropped %d of %d examples whose prompt exceeds max_prompt_length=%d tokens "
            "(--long_prompt_strategy truncate_left keeps them).",
            n_dropped,
            n_rows,
            limits["max_prompt_length"],
        )
    if n_prompt_truncated:
        logger.info(
            "Left-truncated %d of %d prompts to max_prompt_length=%d tokens.",
            n_prompt_truncated,
            n_rows,
            limits["max_prompt_length"],
        )
    if n_completion_truncated:
        logger.info(
            "Truncated %d of %d responses to fit max_length=%d tokens.",
            n_completion_truncated,
            n_rows,
            limits["max_length"],
        )


def _empty_dataset_message(n_rows: int, max_prompt_length: int) -> str:
    """The error text for a dataset with no example left after length filtering."""
    if n_rows == 0:
        return "The dataset has no rows; check the data file or split."
    return (
        f"No examples left: all {n_rows} were dropped because their prompts exceed --max_prompt_length "
        f"({max_prompt_length} tokens); raise --max_prompt_length (and --max_length) or set "
        "--long_prompt_strategy truncate_left."
    )
