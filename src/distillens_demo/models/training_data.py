"""The task suite in memory, as the models train on it: the splits read back from the suite's files, the suite
tokenizer and the tokenised training and validation sets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets

from distillens_trainer.data.tokenization import tokenize_prompt_completion

from ..arguments import DemoArguments
from ..data.suite import (
    build_suite_tokenizer,
    default_max_new_tokens,
    prompt_of,
    read_jsonl,
    write_task_suite,
)


@dataclass
class Suite:
    """The task suite in memory: raw splits, the tokenizer and the tokenised train/validation sets."""

    splits: dict[str, list[dict[str, str]]]
    tokenizer: Any = None
    train_dataset: Any = None
    eval_dataset: Any = None

    @cached_property
    def completion_max_new_tokens(self) -> int:
        """Most tokens an on-policy method samples per training completion: the longest reference answer of the
        training split plus 4, as :func:`default_max_new_tokens` gives the test answers (computed once)."""
        return default_max_new_tokens(self.splits["train"], self.tokenizer)


def write_suite(args: DemoArguments, data_dir: Path) -> dict[str, list[dict[str, str]]]:
    """Write the task suite to ``data_dir`` and read its splits back."""
    paths = write_task_suite(
        data_dir,
        num_train=args.num_train,
        num_eval=args.num_eval,
        num_test=args.num_test,
        seed=args.data_seed,
        tasks=args.tasks,
    )
    return {split: read_jsonl(paths[split]) for split in ("train", "validation", "test")}


def tokenize_examples(examples: Sequence[Mapping[str, str]], tokenizer: Any, template: str):
    """Tokenised ``input_ids``/``attention_mask``/``labels`` rows (prompt masked) as a ``datasets.Dataset``."""
    raw = datasets.Dataset.from_list(
        [{"prompt": prompt_of(example, template), "completion": example["output"]} for example in examples]
    )
    tokenized, _ = tokenize_prompt_completion(raw, tokenizer, max_length=512, max_prompt_length=256)
    return tokenized


def prepare_suite(args: DemoArguments, data_dir: Path, tokenizer: Any = None) -> Suite:
    """Write the suite, train the tokenizer unless one is given, and tokenise train and validation."""
    splits = write_suite(args, data_dir)
    if tokenizer is None:
        tokenizer = build_suite_tokenizer(data_dir.parent / "tokenizer", splits["train"], args.vocab_size)
    suite = Suite(splits=splits, tokenizer=tokenizer)
    suite.train_dataset = tokenize_examples(splits["train"], tokenizer, args.prompt_template)
    suite.eval_dataset = tokenize_examples(splits["validation"], tokenizer, args.prompt_template)
    return suite
