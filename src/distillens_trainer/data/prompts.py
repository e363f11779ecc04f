"""Schemas and prompt templates: raw rows to canonical ``prompt``/``completion`` text."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import datasets
import pyarrow.compute

from .arguments import PROMPT_TEMPLATES, DataArguments, check_choice
from .json_lines import json_kind

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
# Column kept through `to_prompt_completion`: the list of references (S-NI has several per example).
REFERENCES_COLUMN = "outputs"


def format_alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The paper's prompt for one example; the input block appears only when `input` is non-empty."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


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


def _target_text(value: Any) -> str:
    """A response cell as the training target: a list of references gives its first (the MiniLLM convention for
    multi-reference sets), a number its text; :func:`find_unusable_cell` refuses anything else first."""
    if isinstance(value, list) and value:
        return _text(value[0])
    return _text(value)


# What a cell may hold, as one rule per kind of column: a message for a value it refuses, else None.
def _required_text(column: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, str):
            return None
        return f"`{column}` is a JSON {json_kind(value)}, not a string: write it as a string."

    return check


def _optional_text(column: str) -> Callable[[Any], str | None]:
    required = _required_text(column)
    return lambda value: None if value is None else required(value)


def _target(column: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return None
        if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
            return None  # several references: the first is the training target
        if value is None:
            return f"`{column}` is null: give every training row a response text, or drop the row."
        return (
            f"`{column}` is a JSON {json_kind(value)}: give the response as a string (or a non-empty list of "
            "strings, whose first is trained on)."
        )

    return check


def _conversation(column: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return (
                f"`{column}` is a JSON {json_kind(value)}, not a list of turns: write each conversation as "
                '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}].'
            )
        for turn in value:
            if not (isinstance(turn, dict) and isinstance(turn.get("role"), str)):
                return f'`{column}` holds a turn without a string "role": give every turn a role and content.'
            if not isinstance(turn.get("content"), str):
                return f'`{column}` holds a turn whose "content" is not a string: write every content as a string.'
        if not any(turn["role"] == "assistant" for turn in value):
            return (
                f"`{column}` has no assistant turn to learn from: end every training conversation with one."
            )
        return None

    return check


def _cell_rules(schema: str, args: DataArguments) -> list[tuple[str, Callable[[Any], str | None]]]:
    """(column, rule) for every column a training row of `schema` is built from."""
    if schema == "messages":
        return [(args.messages_column, _conversation(args.messages_column))]
    if schema == "instruction":
        return [
            (args.instruction_column, _required_text(args.instruction_column)),
            (args.input_column, _optional_text(args.input_column)),
            (args.output_column, _target(args.output_column)),
        ]
    return [
        (args.prompt_column, _required_text(args.prompt_column)),
        (args.completion_column, _target(args.completion_column)),
    ]


def _first_refused(
    dataset: datasets.Dataset, column: str, rule: Callable[[Any], str | None]
) -> tuple[int, str] | None:
    """(row index, message) of the first cell of `column` that `rule` refuses. A string column, where strings
    are what `rule` wants, is checked for nulls in Arrow, without reading its values into Python."""
    feature = dataset.features[column]
    strings_pass = rule("") is None
    if (
        strings_pass
        and getattr(feature, "dtype", None) in ("string", "large_string")
        and dataset._indices is None
    ):
        array = dataset.data.column(column)
        if array.null_count == 0 or rule(None) is None:
            return None
        return pyarrow.compute.index(pyarrow.compute.is_null(array), True).as_py(), str(rule(None))
    for index, value in enumerate(dataset[column]):
        message = rule(value)
        if message is not None:
            return index, message
    return None


def find_unusable_cell(
    dataset: datasets.Dataset, data_args: DataArguments | None = None
) -> tuple[int, str] | None:
    """(row index, what is wrong and the fix) of the first training row whose cells cannot be trained on, or None.

    Prompt cells (instruction, prompt) must be strings; ``input`` a string or null; a response (output,
    completion) a string, a number (its text) or a non-empty list of strings (the first is the target); a
    conversation a list of ``{"role", "content"}`` turns, with strings, holding an assistant turn. Nothing is
    converted silently: a null response or a list of turns with a non-string content is refused.
    """
    args = data_args or DataArguments()
    schema = detect_schema(dataset.column_names, args)
    found = [
        problem
        for column, rule in _cell_rules(schema, args)
        if column in dataset.column_names and (problem := _first_refused(dataset, column, rule)) is not None
    ]
    return min(found) if found else None


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
        completion = _target_text(example.get(args.output_column))
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
    return prompt, _target_text(example.get(args.completion_column))


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
    check_choice("prompt_template", template, PROMPT_TEMPLATES)
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
