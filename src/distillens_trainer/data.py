"""Instruction data: loading, prompt formatting, tokenisation with prompt masking, and collation.

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

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch

from .decontamination import drop_contaminated, prompt_set

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# The Alpaca-style template used by MiniLLM, DistiLLM and the DistillLens paper (non-Qwen models).
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

PROMPT_TEMPLATES: tuple[str, ...] = ("alpaca", "chat", "plain")
LONG_PROMPT_STRATEGIES: tuple[str, ...] = ("drop", "truncate_left")
SCHEMAS: tuple[str, ...] = ("messages", "instruction", "prompt_completion")

# File extension -> `datasets` packaged builder.
FILE_BUILDERS: dict[str, str] = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Suffixes that mark a missing *file* (rather than a hub dataset id) when the path does not exist.
_FILE_LIKE_SUFFIXES = frozenset({*FILE_BUILDERS, ".txt", ".tsv", ".arrow", ".gz", ".zip", ".xz", ".zst"})

# Column kept through `to_prompt_completion`: the list of references (S-NI has several per example).
REFERENCES_COLUMN = "outputs"

# Fixed seed for carving a validation split from train, so the eval set does not move with --seed.
VALIDATION_SPLIT_SEED = 42

_HELPER_COLUMNS = ("_prompt_truncated", "_completion_truncated")


def format_alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The paper's prompt for one example; the input block appears only when `input` is non-empty."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


# --------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------


@dataclass
class DataArguments:
    """Where the instruction data lives, how it is formatted and how long sequences may be.

    Parsed by ``transformers.HfArgumentParser`` next to the training arguments (no field names collide).
    """

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a local .json/.jsonl/.csv/.parquet file or a datasets.save_to_disk "
            "folder (then --train_split picks the split)."
        },
    )
    validation_file: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation data, same formats as --train_file; for a save_to_disk folder the split is "
            "--validation_split (default 'validation')."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A hub dataset id or a local datasets.save_to_disk folder, instead of --train_file."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration (subset) name of --dataset_name."}
    )
    train_split: str = field(
        default="train",
        metadata={"help": "Split of --dataset_name (or of a save_to_disk folder) to train on."},
    )
    validation_split: str | None = field(
        default=None,
        metadata={
            "help": "Split of --dataset_name (or of a save_to_disk folder) to evaluate on; none by default."
        },
    )
    prompt_template: str = field(
        default="alpaca",
        metadata={
            "help": "Prompt format: 'alpaca' (the paper's template), 'chat' (the tokenizer's chat template) "
            "or 'plain' (prompt text followed directly by the completion). On the command line the default is "
            "the format recorded with the teacher or student (distillens.json), else alpaca.",
            "choices": list(PROMPT_TEMPLATES),
        },
    )
    instruction_column: str = field(
        default="instruction", metadata={"help": "Column holding the instruction."}
    )
    input_column: str = field(
        default="input", metadata={"help": "Column holding the optional input (context) of an instruction."}
    )
    output_column: str = field(default="output", metadata={"help": "Column holding the reference response."})
    prompt_column: str = field(
        default="prompt", metadata={"help": "Prompt column of a prompt/completion dataset."}
    )
    completion_column: str = field(
        default="completion", metadata={"help": "Completion column of a prompt/completion dataset."}
    )
    messages_column: str = field(
        default="messages",
        metadata={
            "help": "Column holding a conversation: a list of {role, content}; the last assistant message "
            "is the completion."
        },
    )
    max_length: int = field(
        default=512,
        metadata={"help": "Maximum tokens of prompt + response; the response is truncated to fit."},
    )
    max_prompt_length: int = field(
        default=256,
        metadata={"help": "Maximum prompt tokens (template included); must be below --max_length."},
    )
    long_prompt_strategy: str = field(
        default="drop",
        metadata={
            "help": "What to do with prompts longer than --max_prompt_length: 'drop' the example (the "
            "paper's choice) or 'truncate_left' (keep the prompt's last tokens).",
            "choices": list(LONG_PROMPT_STRATEGIES),
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Keep only the first N training rows (before length filtering), for quick runs."},
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N evaluation rows (before length filtering)."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for formatting and tokenisation (default: one)."}
    )
    decontaminate_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Evaluation files (JSONL with instruction/input, as distillens eval reads): training rows whose "
            "formatted prompt (case and whitespace folded) appears in any of them are dropped, after "
            "--max_train_samples; the count is logged and saved in distillens_config.json."
        },
    )
    validation_split_percentage: int = field(
        default=0,
        metadata={
            "help": "Percent of the training rows held out for evaluation when no --validation_file or "
            "--validation_split is given; 0 = none. The split uses a fixed seed, independent of --seed."
        },
    )

    def __post_init__(self) -> None:
        _check_choice("prompt_template", self.prompt_template, PROMPT_TEMPLATES)
        _check_choice("long_prompt_strategy", self.long_prompt_strategy, LONG_PROMPT_STRATEGIES)
        _check_lengths(self.max_length, self.max_prompt_length)
        for name in ("max_train_samples", "max_eval_samples", "preprocessing_num_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be a positive integer or unset, got {value}.")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(
                f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}."
            )
        if self.train_file is not None and self.dataset_name is not None:
            raise ValueError("Set either --train_file or --dataset_name, not both.")
        if self.dataset_config_name is not None and self.dataset_name is None:
            raise ValueError(
                "--dataset_config_name needs --dataset_name; set it or drop --dataset_config_name."
            )
        if self.validation_split_percentage and (self.validation_file or self.validation_split):
            raise ValueError(
                "--validation_split_percentage carves eval data from train; drop it when --validation_file or "
                "--validation_split is given."
            )


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """ValueError naming `--name` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"--{name} must be one of {', '.join(choices)}; got {value!r}.")


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    """ValueError unless 0 < max_prompt_length < max_length (a response token must always fit)."""
    if max_prompt_length < 1:
        raise ValueError(f"--max_prompt_length must be positive, got {max_prompt_length}.")
    if max_prompt_length >= max_length:
        raise ValueError(
            f"--max_prompt_length ({max_prompt_length}) must be below --max_length ({max_length}); "
            "raise --max_length or lower --max_prompt_length."
        )


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def load_raw_dataset(source: str, split: str = "train", config_name: str | None = None) -> datasets.Dataset:
    """Load one split of raw rows from a local file, a local folder or the hub.

    - an existing ``.json``/``.jsonl``/``.csv``/``.parquet`` file: all its rows (`split` is ignored);
    - an existing ``save_to_disk`` folder: the stored ``Dataset``, or ``split`` of a stored ``DatasetDict``;
    - another existing folder: ``datasets.load_dataset(folder, config_name, split=split)`` (data files);
    - anything else that does not look like a file path: a hub dataset id, via ``datasets.load_dataset``.

    CSV cells are read as text: empty cells stay ``""`` and strings such as ``"NA"`` are not turned into nulls.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_directory(path, split, config_name)
    if path.is_file():
        return _load_file(path)
    if _looks_like_file_path(source):
        raise ValueError(f"Data file not found: {source!r} (relative paths resolve from {Path.cwd()}).")
    return datasets.load_dataset(source, config_name, split=split)


def _looks_like_file_path(source: str) -> bool:
    """True when a non-existent `source` was meant as a local path rather than a hub dataset id."""
    return source.startswith(("/", ".", "~")) or Path(source).suffix.lower() in _FILE_LIKE_SUFFIXES


def _load_file(path: Path) -> datasets.Dataset:
    """All rows of one local data file, picking the `datasets` builder from the extension."""
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        supported = ", ".join(sorted(FILE_BUILDERS))
        raise ValueError(
            f"Unsupported data file extension {path.suffix!r} for {str(path)!r}; use one of {supported} "
            "or a datasets.save_to_disk folder."
        )
    size = path.stat().st_size
    if size == 0 or (size < 4096 and not path.read_bytes().strip()):
        raise ValueError(f"Data file {str(path)!r} is empty: give a file with at least one example.")
    options: dict[str, Any] = {"keep_default_na": False} if builder == "csv" else {}
    return datasets.load_dataset(builder, data_files=str(path), split="train", **options)


def _load_directory(path: Path, split: str, config_name: str | None) -> datasets.Dataset:
    """One split of a ``save_to_disk`` folder, or of a folder of data files."""
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return datasets.load_dataset(str(path), config_name, split=split)
    stored = datasets.load_from_disk(str(path))
    if isinstance(stored, datasets.Dataset):
        return stored
    if split not in stored:
        raise ValueError(
            f"Split {split!r} not found in {str(path)!r} (it has {', '.join(stored)}); "
            "set --train_split / --validation_split to one of those."
        )
    return stored[split]


def load_raw_splits(data_args: DataArguments) -> tuple[datasets.Dataset | None, datasets.Dataset | None]:
    """The raw (untokenised) train and eval rows described by `data_args`, before any row limit.

    Eval rows come from, in order: --validation_file; --validation_split of the train source (a hub dataset or
    a save_to_disk folder); a --validation_split_percentage share of train carved with a fixed seed; else none.
    """
    train_source = data_args.train_file or data_args.dataset_name
    if train_source is None and data_args.validation_file is None:
        raise ValueError("No data given: set --train_file, --dataset_name or --validation_file.")
    for flag in ("train_file", "validation_file"):
        path = getattr(data_args, flag)
        if path is not None and not Path(path).expanduser().exists():
            raise ValueError(f"--{flag}: no such file or folder: {path!r}.")
    for path in data_args.decontaminate_files or ():
        if not Path(path).expanduser().is_file():
            raise ValueError(f"--decontaminate_files: no such file: {path!r}.")

    train = None
    if train_source is not None:
        train = load_raw_dataset(train_source, data_args.train_split, data_args.dataset_config_name)

    evaluation = None
    if data_args.validation_file is not None:
        evaluation = load_raw_dataset(data_args.validation_file, data_args.validation_split or "validation")
    elif data_args.validation_split is not None:
        if train_source is None:
            raise ValueError(
                "--validation_split picks a split of --dataset_name or --train_file; set one of them."
            )
        if data_args.train_file is not None and Path(data_args.train_file).expanduser().is_file():
            raise ValueError(
                f"--validation_split cannot pick a split of the single file {data_args.train_file!r}; "
                "use --validation_file or --validation_split_percentage instead."
            )
        evaluation = load_raw_dataset(train_source, data_args.validation_split, data_args.dataset_config_name)
    elif data_args.validation_split_percentage and train is not None:
        train, evaluation = carve_validation_split(train, data_args.validation_split_percentage)
    return train, evaluation


def carve_validation_split(
    dataset: datasets.Dataset, percentage: int, seed: int = VALIDATION_SPLIT_SEED
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval): a shuffled `percentage`% of rows (at least one) held out; deterministic for a given seed."""
    n_eval = max(1, round(len(dataset) * percentage / 100))
    if n_eval >= len(dataset):
        raise ValueError(
            f"--validation_split_percentage={percentage} leaves no training rows out of {len(dataset)}; "
            "lower it or give --validation_file."
        )
    parts = dataset.train_test_split(test_size=n_eval, shuffle=True, seed=seed)
    return parts["train"], parts["test"]


def _first_rows(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    """The first `limit` rows (all rows when `limit` is None or exceeds the length)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.select(range(limit))


# --------------------------------------------------------------------------------------------------------
# Schemas and prompt formatting
# --------------------------------------------------------------------------------------------------------


def detect_schema(
    column_names: Iterable[str], data_args: DataArguments | None = None, *, require_completion: bool = True
) -> str:
    """Which schema the columns follow: ``"messages"``, ``"instruction"`` or ``"prompt_completion"``.

    Checked in that order with the column names of `data_args` (the defaults when None). ``instruction`` needs
    the instruction and output columns (input is optional); ``prompt_completion`` needs both of its columns.
    With ``require_completion=False`` (prompts for generation) the output/completion column may be absent.
    """
    args = data_args or DataArguments()
    found = set(column_names)
    if args.messages_column in found:
        return "messages"
    if {args.instruction_column, args.output_column} <= found or (
        not require_completion and args.instruction_column in found
    ):
        return "instruction"
    if {args.prompt_column, args.completion_column} <= found or (
        not require_completion and args.prompt_column in found
    ):
        return "prompt_completion"
    raise ValueError(
        f"Cannot find instruction data columns among {sorted(found)}: expected {args.messages_column!r}, or "
        f"{args.instruction_column!r} + {args.output_column!r} (+ optional {args.input_column!r}), or "
        f"{args.prompt_column!r} + {args.completion_column!r}; set --messages_column, "
        "--instruction_column/--input_column/--output_column or --prompt_column/--completion_column."
    )


def split_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, str]], str | None]:
    """(prompt turns, completion) of a conversation.

    The last assistant message is the completion and the turns before it are the prompt; turns after it are
    ignored. Without any assistant message every turn is prompt and the completion is None. Turns are
    reduced to ``{"role", "content"}``.
    """
    turns = [{"role": str(turn["role"]), "content": _text(turn["content"])} for turn in messages]
    assistant_positions = [i for i, turn in enumerate(turns) if turn["role"] == "assistant"]
    if not assistant_positions:
        return turns, None
    last = assistant_positions[-1]
    return turns[:last], turns[last]["content"]


def render_messages_as_text(turns: Sequence[Mapping[str, str]]) -> str:
    """Conversation as plain text, one block per turn: ``"User: hi\\n\\nAssistant: hello"``."""
    return "\n\n".join(f"{turn['role'].capitalize()}: {turn['content']}" for turn in turns)


def _text(value: Any) -> str:
    """A cell as text: None (a missing value) becomes ``""``, other non-strings go through ``str``."""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _join_instruction_input(instruction: str, input: str) -> str:
    """Instruction and input as one user message: separated by a blank line, input only when non-empty."""
    return f"{instruction}\n\n{input}" if input else instruction


def _check_chat_template(tokenizer: Any) -> None:
    """ValueError unless `tokenizer` can render ``prompt_template='chat'``."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "--prompt_template chat needs a tokenizer with a chat_template; set tokenizer.chat_template or use "
            "--prompt_template alpaca / plain."
        )


def _chat_prompt(turns: list[dict[str, str]], tokenizer: Any) -> str:
    """Prompt turns through the tokenizer's chat template, ending with the assistant generation cue."""
    _check_chat_template(tokenizer)
    return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)


def _format_single_turn(user_text: str, tokenizer: Any, template: str) -> str:
    """Prompt for a single user request (no separate input)."""
    if template == "alpaca":
        return format_alpaca_prompt(user_text)
    if template == "chat":
        return _chat_prompt([{"role": "user", "content": user_text}], tokenizer)
    return user_text


def _messages_prompt(turns: list[dict[str, str]], tokenizer: Any, template: str) -> str:
    """Prompt for conversation turns.

    chat: the chat template. alpaca: a lone user turn is the instruction, a longer conversation is rendered
    with :func:`render_messages_as_text` and used as the instruction. plain: the rendered conversation
    followed by ``"\\n\\nAssistant: "``.
    """
    if template == "chat":
        return _chat_prompt(turns, tokenizer)
    if template == "alpaca":
        if len(turns) == 1 and turns[0]["role"] == "user":
            return format_alpaca_prompt(turns[0]["content"])
        return format_alpaca_prompt(render_messages_as_text(turns))
    transcript = render_messages_as_text(turns)
    return f"{transcript}\n\nAssistant: " if transcript else "Assistant: "


def _prompt_and_completion(
    example: Mapping[str, Any], schema: str, template: str, tokenizer: Any, args: DataArguments
) -> tuple[str, str | None]:
    """(formatted prompt, completion text or None) of one raw row in `schema`."""
    if schema == "messages":
        turns, completion = split_messages(example[args.messages_column])
        return _messages_prompt(turns, tokenizer, template), completion
    if schema == "instruction":
        instruction = _text(example[args.instruction_column])
        input_text = _text(example.get(args.input_column))
        completion = _text(example.get(args.output_column))
        if template == "alpaca":
            prompt = format_alpaca_prompt(instruction, input_text)
        elif template == "chat":
            prompt = _chat_prompt(
                [{"role": "user", "content": _join_instruction_input(instruction, input_text)}], tokenizer
            )
        else:
            prompt = _join_instruction_input(instruction, input_text) + "\n"
        return prompt, completion
    prompt = _format_single_turn(_text(example[args.prompt_column]), tokenizer, template)
    return prompt, _text(example.get(args.completion_column))


def build_prompt(
    example: Mapping[str, Any], tokenizer: Any, template: str, *, data_args: DataArguments | None = None
) -> str:
    """The formatted prompt of one raw row, ready for generation (the same text training conditions on).

    - alpaca: :func:`format_alpaca_prompt` of instruction (+ input); a prompt column is the instruction;
    - chat: ``tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)``, with
      instruction and input joined by a blank line as the user message;
    - plain: the prompt text as is; instruction (+ ``"\\n\\n"`` + input) followed by ``"\\n"``; a conversation
      rendered by :func:`render_messages_as_text` followed by ``"\\n\\nAssistant: "``.

    For a conversation the last assistant message (the reference) and anything after it are left out. The
    output/completion column is optional here.
    Column names come from `data_args` (the defaults when None); `tokenizer` may be None unless template is chat.
    """
    _check_choice("prompt_template", template, PROMPT_TEMPLATES)
    args = data_args or DataArguments()
    schema = detect_schema(example.keys(), args, require_completion=False)
    prompt, _ = _prompt_and_completion(example, schema, template, tokenizer, args)
    return prompt


def _prompt_completion_batch(
    batch: dict[str, list[Any]], *, schema: str, tokenizer: Any, args: DataArguments
) -> dict[str, list[Any]]:
    """Batched map body of :func:`to_prompt_completion`."""
    n_rows = len(next(iter(batch.values())))
    prompts, completions = [], []
    for i in range(n_rows):
        row = {name: values[i] for name, values in batch.items()}
        prompt, completion = _prompt_and_completion(row, schema, args.prompt_template, tokenizer, args)
        if completion is None:
            raise ValueError(
                f"A conversation in column {args.messages_column!r} has no assistant message to learn from; "
                "end every training conversation with an assistant turn."
            )
        prompts.append(prompt)
        completions.append(completion)
    out: dict[str, list[Any]] = {"prompt": prompts, "completion": completions}
    if REFERENCES_COLUMN in batch:
        out[REFERENCES_COLUMN] = batch[REFERENCES_COLUMN]
    return out


def to_prompt_completion(
    dataset: datasets.Dataset, tokenizer: Any, data_args: DataArguments
) -> datasets.Dataset:
    """Raw rows -> columns ``prompt`` (formatted with ``data_args.prompt_template``) and ``completion`` (text).

    The schema is detected once with :func:`detect_schema`; an ``outputs`` list column (several references,
    as in S-NI) is kept for evaluation, every other column is removed.
    """
    schema = detect_schema(dataset.column_names, data_args)
    if data_args.prompt_template == "chat":
        _check_chat_template(tokenizer)
    return dataset.map(
        partial(_prompt_completion_batch, schema=schema, tokenizer=tokenizer, args=data_args),
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=data_args.preprocessing_num_workers,
        desc=f"Formatting prompts ({data_args.prompt_template})",
    )


# --------------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------------


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether `tokenizer` puts BOS in front of plain text when adding special tokens (Llama: yes, GPT-2: no)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]


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
        head = prompt[:1] if bos_token_id is not None else []
        prompt = head + prompt[len(prompt) - (max_prompt_length - len(head)) :]
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
    _check_choice("long_prompt_strategy", long_prompt_strategy, LONG_PROMPT_STRATEGIES)
    _check_lengths(max_length, max_prompt_length)
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


# --------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------


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
            train_raw = _first_rows(train_raw, data_args.max_train_samples)
            train = _prepare_for_training(train_raw, tokenizer, data_args, "Train", stats)
        if eval_raw is not None:
            eval_raw = _first_rows(eval_raw, data_args.max_eval_samples)
            eval_set = _prepare_for_training(eval_raw, tokenizer, data_args, "Eval")
    return train, eval_set


# --------------------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------------------


def resolve_pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to its EOS id (GPT-2 has no pad token)."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    raise ValueError(
        "Cannot pad: the tokenizer has neither pad_token nor eos_token; set tokenizer.pad_token "
        "or pass pad_token_id to DataCollatorForCompletionOnly."
    )


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
