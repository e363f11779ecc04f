"""End to end: the tokenised train and eval sets described by :class:`DataArguments`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import datasets

from .arguments import DataArguments
from .decontamination import drop_contaminated, prompt_set
from .prompts import build_prompt, to_prompt_completion
from .sources import first_rows, load_raw_dataset, load_raw_splits
from .tokenization import tokenize_prompt_completion

logger = logging.getLogger(__name__)


def evaluation_prompt_set(paths: Sequence[str], tokenizer: Any, data_args: DataArguments) -> set[str]:
    """Normalised formatted prompts of every row of `paths`, built like training prompts.

    Rows are read with the training column names when they have them, else with the defaults
    (instruction/input/output, the layout ``distillens eval`` reads).
    """

    def prompt_of(row: Mapping[str, Any]) -> str:
        try:
            return build_prompt(row, tokenizer, data_args.prompt_template, data_args=data_args)
        except ValueError:
            return build_prompt(row, tokenizer, data_args.prompt_template)

    return prompt_set(prompt_of(row) for path in paths for row in load_raw_dataset(path))


def decontaminate(
    formatted: datasets.Dataset, tokenizer: Any, data_args: DataArguments
) -> tuple[datasets.Dataset, int]:
    """Formatted training rows minus those whose prompt is in ``--decontaminate_files``; logs the count."""
    if not data_args.decontaminate_files:
        return formatted, 0
    evaluation_prompts = evaluation_prompt_set(data_args.decontaminate_files, tokenizer, data_args)
    kept, n_dropped = drop_contaminated(formatted, evaluation_prompts)
    logger.warning(
        "Decontamination: dropped %d of %d training rows whose prompt appears in %s.",
        n_dropped,
        len(formatted),
        ", ".join(data_args.decontaminate_files),
    )
    if len(kept) == 0:
        raise ValueError(
            "--decontaminate_files removed every training row: every prompt appears in the evaluation files."
        )
    return kept, n_dropped


def _prepare_for_training(
    raw: datasets.Dataset,
    tokenizer: Any,
    data_args: DataArguments,
    name: str,
    stats: dict[str, int] | None = None,
) -> datasets.Dataset:
    """Format, decontaminate (training rows only) and tokenise one raw split; `name` labels the log line."""
    formatted = to_prompt_completion(raw, tokenizer, data_args)
    if name == "Train":
        formatted, n_contaminated = decontaminate(formatted, tokenizer, data_args)
        if stats is not None and data_args.decontaminate_files:
            stats["decontaminated_train_rows"] = n_contaminated
    tokenized, n_dropped = tokenize_prompt_completion(
        formatted,
        tokenizer,
        data_args.max_length,
        data_args.max_prompt_length,
        data_args.long_prompt_strategy,
        num_proc=data_args.preprocessing_num_workers,
    )
    logger.info("%s set: %d examples (%d dropped by length).", name, len(tokenized), n_dropped)
    return tokenized


def build_datasets(
    data_args: DataArguments,
    tokenizer: Any,
    *,
    main_process_first: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    stats: dict[str, int] | None = None,
) -> tuple[datasets.Dataset | None, datasets.Dataset | None]:
    """Tokenised (train, eval) datasets described by `data_args`; either is None when it has no source.

    Rows are chosen by :func:`load_raw_splits`, cut to --max_train_samples / --max_eval_samples (first rows,
    before length filtering, after carving the validation split), then formatted, decontaminated (training rows,
    with --decontaminate_files; the count goes to ``stats["decontaminated_train_rows"]`` when `stats` is given)
    and tokenised.
    Pass ``training_args.main_process_first`` so that, in distributed runs, the main process fills the
    `datasets` cache before the others read it.
    """
    with main_process_first():
        train_raw, eval_raw = load_raw_splits(data_args)
        train = eval_set = None
        if train_raw is not None:
            train_raw = first_rows(train_raw, data_args.max_train_samples)
            train = _prepare_for_training(train_raw, tokenizer, data_args, "Train", stats)
        if eval_raw is not None:
            eval_raw = first_rows(eval_raw, data_args.max_eval_samples)
            eval_set = _prepare_for_training(eval_raw, tokenizer, data_args, "Eval")
    return train, eval_set
