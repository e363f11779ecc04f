"""Parsing a command line ``distillens COMMAND [CONFIG] [--field value ...]`` into dataclasses with
``HfArgumentParser``: YAML/JSON config files, one-line errors (:class:`CommandLineError`), ``--help`` grouped by
dataclass, and which fields were given explicitly."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class CommandLineError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors are one line, raised instead of printed with the whole usage, and whose
    ``--help`` shows each dataclass in its own titled group, the fields a dataclass adds to
    ``TrainingArguments`` (the distillation settings) first."""

    def __init__(self, dataclass_types: Sequence[type], prog: str) -> None:
        self._first_groups: list[Any] = []  # the fields a TrainingArguments subclass adds
        self._own_groups: list[Any] = []
        super().__init__(list(dataclass_types), prog=prog, usage=f"{prog} [CONFIG] [--field value ...]")
        ordered = self._first_groups + [
            group for group in self._own_groups if group not in self._first_groups
        ]
        rest = [group for group in self._action_groups if group not in ordered]
        builtin, inherited = rest[:2], rest[2:]  # argparse's "positional arguments" and "options" come first
        self._action_groups = builtin + ordered + inherited

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(message)

    def _add_dataclass_arguments(self, dtype: Any) -> None:
        from typing import get_type_hints

        from transformers import TrainingArguments

        type_hints = get_type_hints(dtype)
        base = (
            TrainingArguments
            if issubclass(dtype, TrainingArguments) and dtype is not TrainingArguments
            else None
        )
        base_names = {item.name for item in dataclasses.fields(base)} if base else set()
        own = self.add_argument_group(_group_title(dtype))
        self._own_groups.append(own)
        if base:
            self._first_groups.append(own)
        inherited = self.add_argument_group("training (transformers.TrainingArguments)") if base else None
        for item in dataclasses.fields(dtype):
            if not item.init:
                continue
            item.type = type_hints[item.name]
            group = inherited if item.name in base_names else own
            self._parse_dataclass_field(group, item)
            negative = f"--no_{item.name}"
            if negative in self._option_string_actions:
                self._option_string_actions[negative].help = f"Set --{item.name} to false."


GROUP_TITLES = {
    "DistillLensConfig": "distillation (DistillLensConfig: the teacher and the loss)",
    "ModelArguments": "model (the student, for train and lens)",
    "LoraArguments": "LoRA adapter",
    "DataArguments": "data",
    "PromptFormatArguments": "data format",
    "OutputArguments": "output folder",
    "CacheArguments": "teacher cache",
    "LensArguments": "lens profile",
    "ShrinkArguments": "shrink",
    "EvalArguments": "evaluation",
    "GenerationSettings": "generation",
    "DemoArguments": "demo",
}


def _group_title(dtype: type) -> str:
    return GROUP_TITLES.get(dtype.__name__, dtype.__name__)


def read_config_file(path: str) -> dict[str, Any]:
    """The key/value pairs of a YAML or JSON config file."""
    file = Path(path)
    if not file.is_file():
        raise CommandLineError(f"config file {path!r} does not exist.")
    try:
        text = file.read_text(encoding="utf-8")
        values = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CommandLineError(f"config file {path!r} could not be read: {first_line}") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise CommandLineError(f"config file {path!r} must hold a mapping of field names to values.")
    return values


def config_to_argv(values: dict[str, Any]) -> list[str]:
    """``{"learning_rate": 1e-4, "lens_student_layers": [2, 4]}`` -> ``["--learning_rate", "0.0001", ...]``."""
    argv: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, list | tuple):
            argv.extend(str(item) for item in value)
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        elif isinstance(value, bool):
            argv.append("true" if value else "false")
        else:
            argv.append(str(value))
    return argv


def expand_config_file(argv: Sequence[str]) -> list[str]:
    """``[CONFIG] [--field value ...]`` -> the config file's values as flags, then the command line's."""
    argv = list(argv)
    if not argv or argv[0].startswith("-"):
        return argv
    if not argv[0].endswith(CONFIG_SUFFIXES):
        raise CommandLineError(
            f"{argv[0]!r} is not a config file: give a .yaml, .yml or .json file, or only --flags."
        )
    return config_to_argv(read_config_file(argv[0])) + argv[1:]


def given_fields(argv: Sequence[str]) -> set[str]:
    """The field names set explicitly (in the config file or as flags), so defaults can be told apart."""
    names = set()
    for item in expand_config_file(argv):
        if item.startswith("--"):
            name = item[2:].split("=", 1)[0].replace("-", "_")
            names.add(name[3:] if name.startswith("no_") else name)
    return names


def parse_command(dataclass_types: Sequence[type], argv: Sequence[str], prog: str) -> tuple[Any, ...]:
    """Parse ``[CONFIG] [--field value ...]`` into the dataclasses; overrides win over the file."""
    parser = _Parser(list(dataclass_types), prog=prog)
    parsed = parser.parse_args_into_dataclasses(args=expand_config_file(argv), return_remaining_strings=True)
    *dataclasses_, remaining = parsed
    if remaining:
        raise CommandLineError(f"unknown arguments: {' '.join(remaining)} (see --help for every field).")
    return tuple(dataclasses_)
