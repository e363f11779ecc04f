"""``distillens demo``: the offline end-to-end comparison on the built-in task suite (:mod:`distillens_demo`)."""

from __future__ import annotations

from collections.abc import Sequence

from distillens_demo.arguments import DemoArguments
from distillens_demo.run import output_summary, run_demo

from .parsing import parse_command


def main(argv: Sequence[str]) -> int:
    """``distillens demo [CONFIG] [--output_dir runs/demo] [--preset smoke] ...``."""
    (demo_args,) = parse_command((DemoArguments,), argv, "distillens demo")
    results = run_demo(demo_args)
    print(output_summary(demo_args, results))
    return 0
