"""``distillens``: the command line (``train``, ``eval``, ``demo``), parsed with ``HfArgumentParser``.

Each subcommand takes an optional YAML/JSON config file first, then command-line overrides::

    distillens train recipe.yaml --learning_rate 1e-4

Bad input ends in one ``distillens <command>: error: ...`` line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser

USAGE_ERROR, RUN_ERROR = 2, 1
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class CommandLineError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors are one line, raised instead of printed with the whole usage."""

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(message)


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


def parse_command(dataclass_types: Sequence[type], argv: Sequence[str], prog: str) -> tuple[Any, ...]:
    """Parse ``[CONFIG] [--field value ...]`` into the dataclasses; overrides win over the file."""
    argv = list(argv)
    file_argv: list[str] = []
    if argv and not argv[0].startswith("-"):
        if not argv[0].endswith(CONFIG_SUFFIXES):
            raise CommandLineError(
                f"{argv[0]!r} is not a config file: give a .yaml, .yml or .json file, or only --flags."
            )
        file_argv = config_to_argv(read_config_file(argv.pop(0)))
    parser = _Parser(list(dataclass_types), prog=prog)
    parsed = parser.parse_args_into_dataclasses(args=file_argv + argv, return_remaining_strings=True)
    *dataclasses, remaining = parsed
    if remaining:
        raise CommandLineError(f"unknown arguments: {' '.join(remaining)} (see --help for every field).")
    return tuple(dataclasses)


# --------------------------------------------------------------------------------------- subcommands
def _train(argv: Sequence[str]) -> int:
    from .config import DistillLensConfig
    from .data import DataArguments
    from .pipeline import ModelArguments, run_training

    model_args, data_args, training_args = parse_command(
        (ModelArguments, DataArguments, DistillLensConfig), argv, "distillens train"
    )
    run_training(model_args, data_args, training_args)
    return 0


def _eval(argv: Sequence[str]) -> int:
    from .evaluation import EvalArguments, run_evaluation

    (eval_args,) = parse_command((EvalArguments,), argv, "distillens eval")
    report = run_evaluation(eval_args)
    for result in report["results"]:
        print(
            f"{result['name']}: n={result['num_examples']} rougeL={result['rougeL']['mean']:.2f}"
            f"±{result['rougeL']['std']:.2f} exact_match={result['exact_match']['mean']:.2f}"
        )
    return 0


def _demo(argv: Sequence[str]) -> int:
    from .demo import DemoArguments, run_demo

    (demo_args,) = parse_command((DemoArguments,), argv, "distillens demo")
    run_demo(demo_args)
    return 0


@dataclass(frozen=True)
class Command:
    run: Callable[[Sequence[str]], int]
    help: str


COMMANDS: dict[str, Command] = {
    "train": Command(
        _train, "distil (or SFT) a student: distillens train [CONFIG] --model_name_or_path S ..."
    ),
    "eval": Command(_eval, "generate and score ROUGE-L / exact match on instruction JSONL files"),
    "demo": Command(_demo, "offline end-to-end demo on the built-in task suite"),
}


def _usage() -> str:
    lines = ["usage: distillens {train,eval,demo} [CONFIG] [--field value ...]", "", "commands:"]
    lines += [f"  {name:6s} {command.help}" for name, command in COMMANDS.items()]
    lines += ["", "Run 'distillens COMMAND --help' for every field of a command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else USAGE_ERROR
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"distillens: error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}.",
            file=sys.stderr,
        )
        return USAGE_ERROR
    try:
        return COMMANDS[name].run(rest)
    except CommandLineError as error:
        print(f"distillens {name}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except ValueError as error:
        print(f"distillens {name}: error: {_one_line(error)}", file=sys.stderr)
        return RUN_ERROR
    except KeyboardInterrupt:
        print(
            f"distillens {name}: interrupted; completed checkpoints are kept in the output directory.",
            file=sys.stderr,
        )
        return 130


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
