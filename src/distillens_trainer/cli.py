"""``distillens``: the command line (``train``, ``cache-teacher``, ``eval``, ``demo``, ``shrink``, ``lens``).

Each subcommand takes an optional YAML/JSON config file first, then command-line overrides::

    distillens train recipe.yaml --learning_rate 1e-4

Bad input ends in one ``distillens <command>: error: ...`` line on stderr and a non-zero exit code; a finished
run ends with one ``distillens <command>: ...`` line on stdout saying where its output went. A subcommand is a
module of :mod:`distillens_trainer.commands` with a ``main(argv) -> exit code``, registered in :data:`COMMANDS`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from .commands.parsing import CommandLineError
from .commands.process import end_process_group, exit_launched_process, launched_world_size
from .distributed.quiet import hide_deepspeed_cpu_notice, mentions_deepspeed

USAGE_ERROR, RUN_ERROR = 2, 1


@dataclass(frozen=True)
class Command:
    run: Callable[[Sequence[str]], int]
    help: str


# Each command's module is imported when it runs, so `distillens --help` and a bad command answer at once.
def _train(argv: Sequence[str]) -> int:
    from .commands.train import main as train

    return train(argv)


def _eval(argv: Sequence[str]) -> int:
    from .commands.eval import main as evaluate

    return evaluate(argv)


def _demo(argv: Sequence[str]) -> int:
    from .commands.demo import main as demo

    return demo(argv)


def _shrink(argv: Sequence[str]) -> int:
    from .commands.shrink import main as shrink

    return shrink(argv)


def _cache_teacher(argv: Sequence[str]) -> int:
    from .commands.cache_teacher import main as cache_teacher

    return cache_teacher(argv)


def _lens(argv: Sequence[str]) -> int:
    from .commands.lens import main as lens

    return lens(argv)


COMMANDS: dict[str, Command] = {
    "train": Command(
        _train, "distil (or SFT) a student: distillens train [CONFIG] --model_name_or_path S ..."
    ),
    "cache-teacher": Command(
        _cache_teacher,
        "run the teacher once and keep its signals: cache-teacher --teacher_model_name_or_path T "
        "--model_name_or_path S --train_file F --output_dir C",
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
    lines += [f"  {name:13s} {command.help}" for name, command in COMMANDS.items()]
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
    hide_deepspeed_cpu_notice(not mentions_deepspeed(rest))  # save_pretrained imports an installed DeepSpeed
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
        end_process_group(wait_for_peers=exit_code == 0)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def entry_point() -> NoReturn:
    """The ``distillens`` command (and ``python -m distillens_trainer.cli``): :func:`main`, then exit with its
    code; a rank of a launched run leaves through :func:`commands.process.exit_launched_process`."""
    exit_code = main()
    if launched_world_size() > 1:
        exit_launched_process(exit_code)
    sys.exit(exit_code)


if __name__ == "__main__":
    entry_point()
