"""Command-line arguments of the data pipeline: sources, prompt format, length limits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

PROMPT_TEMPLATES: tuple[str, ...] = ("alpaca", "chat", "plain")
LONG_PROMPT_STRATEGIES: tuple[str, ...] = ("drop", "truncate_left")


@dataclass
class PromptFormatArguments:
    """How a row becomes prompt and response tokens: template, columns and length limits. Shared by every command
    that tokenises instruction data (``train``, ``lens``), so they all read a row the same way."""

    prompt_template: str = field(
        default="alpaca",
        metadata={
            "help": "Prompt format: 'alpaca' (the paper's template), 'chat' (the tokenizer's chat template) "
            "or 'plain' (prompt text followed directly by the completion). On the command line the default is "
            "the format recorded with the teacher or student (distillens.json), else chat when the tokenizer has a "
            "chat template, else alpaca.",
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

    def __post_init__(self) -> None:
        check_choice("prompt_template", self.prompt_template, PROMPT_TEMPLATES)
        check_choice("long_prompt_strategy", self.long_prompt_strategy, LONG_PROMPT_STRATEGIES)
        check_lengths(self.max_length, self.max_prompt_length)


@dataclass
class DataArguments(PromptFormatArguments):
    """Where the instruction data lives, how it is formatted (:class:`PromptFormatArguments`) and how much of it
    is used.

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
        super().__post_init__()
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


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """ValueError naming `--name` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"--{name} must be one of {', '.join(choices)}; got {value!r}.")


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    """ValueError unless 0 < max_prompt_length < max_length (a response token must always fit)."""
    if max_prompt_length < 1:
        raise ValueError(f"--max_prompt_length must be positive, got {max_prompt_length}.")
    if max_prompt_length >= max_length:
        raise ValueError(
            f"--max_prompt_length ({max_prompt_length}) must be below --max_length ({max_length}); "
            "raise --max_length or lower --max_prompt_length."
        )
