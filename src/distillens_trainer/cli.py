"""``distillens``: the command line (``train``, ``eval``, ``demo``, ``shrink``, ``lens``), parsed with
``HfArgumentParser``.

Each subcommand takes an optional YAML/JSON config file first, then command-line overrides::

    distillens train recipe.yaml --learning_rate 1e-4

Bad input ends in one ``distillens <command>: error: ...`` line on stderr and a non-zero exit code; a finished
run ends with one ``distillens <command>: ...`` line on stdout saying where its output went. A subcommand is a
function ``argv -> exit code`` registered in :data:`COMMANDS`; it parses with :func:`parse_command` (and
:func:`given_fields` when a default depends on whether a flag was given).
"""

from __future__ import annotations

import dataclasses
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
    "ModelArguments": "student model",
    "DataArguments": "data",
    "EvalArguments": "evaluation",
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


# --------------------------------------------------------------------------------------- subcommands
def _train(argv: Sequence[str]) -> int:
    from .config import DistillLensConfig
    from .data import DataArguments
    from .distributed import quiet_deepspeed_accelerator_detection
    from .model_info import choose_prompt_template
    from .pipeline import (
        ModelArguments,
        check_reporting_integrations,
        output_summary,
        run_training,
        turn_off_pin_memory_without_accelerator,
    )

    model_args, data_args, training_args = parse_command(
        (ModelArguments, DataArguments, DistillLensConfig), argv, "distillens train"
    )
    given = given_fields(argv)
    check_reporting_integrations(training_args.report_to)
    quiet_deepspeed_accelerator_detection(uses_deepspeed=bool(training_args.deepspeed))
    if "dataloader_pin_memory" not in given:
        turn_off_pin_memory_without_accelerator(training_args)
    teacher = training_args.teacher_model_name_or_path if training_args.objective.needs_teacher else None
    data_args.prompt_template = choose_prompt_template(
        data_args.prompt_template if "prompt_template" in given else None,
        [("teacher", teacher), ("student", model_args.model_name_or_path)],
    )
    run_training(model_args, data_args, training_args)
    summary = output_summary(training_args, data_args.prompt_template, output_dir_given="output_dir" in given)
    if training_args.process_index == 0:  # one line for the run, not one per rank
        print(summary)
    return 0


def _eval(argv: Sequence[str]) -> int:
    from .evaluation import EvalArguments, output_summary, run_evaluation
    from .model_info import choose_prompt_template

    (eval_args,) = parse_command((EvalArguments,), argv, "distillens eval")
    eval_args.prompt_template = choose_prompt_template(
        eval_args.prompt_template if "prompt_template" in given_fields(argv) else None,
        [("model", eval_args.model_name_or_path)],
    )
    report = run_evaluation(eval_args)
    for result in report["results"]:
        print(
            f"{result['name']}: n={result['num_examples']} rougeL={result['rougeL']['mean']:.2f}"
            f"±{result['rougeL']['std']:.2f} exact_match={result['exact_match']['mean']:.2f}"
        )
    print(output_summary(eval_args, report))
    return 0


def _demo(argv: Sequence[str]) -> int:
    from .demo import DemoArguments, output_summary, run_demo
    from .distributed import quiet_deepspeed_accelerator_detection

    (demo_args,) = parse_command((DemoArguments,), argv, "distillens demo")
    quiet_deepspeed_accelerator_detection(uses_deepspeed=False)
    results = run_demo(demo_args)
    print(output_summary(demo_args, results))
    return 0


def _shrink(argv: Sequence[str]) -> int:
    from .layer_map import KEPT_LAYERS_CONFIG_KEY
    from .shrink import ShrinkArguments, run_shrink

    (shrink_args,) = parse_command((ShrinkArguments,), argv, "distillens shrink")
    model = run_shrink(shrink_args)
    kept = getattr(model.config, KEPT_LAYERS_CONFIG_KEY)
    print(f"kept blocks {kept} -> {shrink_args.output_dir} ({model.num_parameters() / 1e6:.1f}M parameters)")
    return 0


def _lens(argv: Sequence[str]) -> int:
    from .diagnostics.command import LensArguments, run_lens, summary_lines
    from .model_info import choose_prompt_template

    (lens_args,) = parse_command((LensArguments,), argv, "distillens lens")
    lens_args.prompt_template = choose_prompt_template(
        lens_args.prompt_template if "prompt_template" in given_fields(argv) else None,
        [("student", lens_args.model_name_or_path), ("teacher", lens_args.teacher_model_name_or_path)],
    )
    print("\n".join(summary_lines(run_lens(lens_args))))
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
    "shrink": Command(
        _shrink,
        "cut a student from a model's blocks: shrink --model_name_or_path T --num_layers K --output_dir S",
    ),
    "lens": Command(_lens, "per-layer logit-lens profile of a student vs a teacher: lens.json and figures"),
}


def _usage() -> str:
    lines = [f"usage: distillens {{{','.join(COMMANDS)}}} [CONFIG] [--field value ...]", "", "commands:"]
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
    exit_code = RUN_ERROR
    try:
        exit_code = COMMANDS[name].run(rest)
        return exit_code
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
    finally:  # under a launcher: after an error, without waiting for peers that may never arrive
        from .distributed import end_process_group

        end_process_group(wait_for_peers=exit_code == 0)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def entry_point() -> NoReturn:
    """The ``distillens`` command (and ``python -m distillens_trainer.cli``): :func:`main`, then exit with its
    code; a rank of a launched run leaves through :func:`distributed.exit_launched_process`."""
    from .distributed import exit_launched_process, launched_world_size

    exit_code = main()
    if launched_world_size() > 1:
        exit_launched_process(exit_code)
    sys.exit(exit_code)


if __name__ == "__main__":
    entry_point()
