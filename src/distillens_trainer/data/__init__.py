"""Instruction data: loading, prompt formatting, tokenisation with prompt masking, and collation.

One module per stage: :mod:`.arguments`, :mod:`.loading`, :mod:`.prompts`, :mod:`.tokenization`,
:mod:`.building` (steps 1-3 end to end), :mod:`.collation`.

The pipeline, one public step per stage so evaluation code can reuse the pieces:

1. :func:`load_raw_dataset` reads a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file, a folder written
   by ``datasets.save_to_disk`` or a hub dataset.
2. :func:`to_prompt_completion` maps one of three schemas (``messages``; ``instruction``/``input``/``output``;
   ``prompt``/``completion``) to canonical ``prompt``/``completion`` text, formatted with a prompt template
   (``alpaca``, ``chat`` or ``plain``). :func:`build_prompt` does the same for one example.
3. :func:`tokenize_prompt_completion` tokenises prompt + completion as one text, finds the prompt/response
   boundary in that encoding, masks the prompt in ``labels`` with :data:`IGNORE_INDEX`, appends EOS and applies
   the length limits.
4. :class:`DataCollatorForCompletionOnly` pads a batch.

:func:`build_datasets` runs steps 1-3 for the train and eval sets described by :class:`DataArguments`.
"""

from __future__ import annotations

from .arguments import LONG_PROMPT_STRATEGIES, PROMPT_TEMPLATES, DataArguments
from .building import build_datasets, decontaminate, evaluation_prompt_set
from .collation import DataCollatorForCompletionOnly
from .prompts import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    REFERENCES_COLUMN,
    build_prompt,
    detect_schema,
    format_alpaca_prompt,
    render_messages_as_text,
    split_messages,
    to_prompt_completion,
)
from .sources import (
    FILE_BUILDERS,
    VALIDATION_SPLIT_SEED,
    carve_validation_split,
    load_raw_dataset,
    load_raw_splits,
)
from .tokenization import assemble_example, split_at_prompt, tokenize_prompt_completion

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "FILE_BUILDERS",
    "LONG_PROMPT_STRATEGIES",
    "PROMPT_TEMPLATES",
    "REFERENCES_COLUMN",
    "VALIDATION_SPLIT_SEED",
    "DataArguments",
    "DataCollatorForCompletionOnly",
    "assemble_example",
    "build_datasets",
    "build_prompt",
    "carve_validation_split",
    "decontaminate",
    "detect_schema",
    "evaluation_prompt_set",
    "format_alpaca_prompt",
    "load_raw_dataset",
    "load_raw_splits",
    "render_messages_as_text",
    "split_at_prompt",
    "split_messages",
    "to_prompt_completion",
    "tokenize_prompt_completion",
]
