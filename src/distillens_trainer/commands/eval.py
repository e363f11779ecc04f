"""``distillens eval``: generate answers for instruction JSONL files and score ROUGE-L and exact match."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from ..evaluation.arguments import EvalArguments
from ..evaluation.generation import GenerationSettings
from ..evaluation.runner import output_summary, run_evaluation
from ..files import writing_into
from ..models.info import choose_prompt_template, decided_prompt_template
from ..models.loading import ModelArguments
from .parsing import given_fields, parse_command


def main(argv: Sequence[str]) -> int:
    """``distillens eval [CONFIG] --model_name_or_path M --eval_files F ... --output_dir O``."""
    model_args, eval_args, settings = parse_command(
        (ModelArguments, EvalArguments, GenerationSettings), argv, "distillens eval"
    )
    template = eval_args.prompt_template if "prompt_template" in given_fields(argv) else None
    models = [("model", model_args.model_name_or_path)]
    decided = decided_prompt_template(template, models)
    choose_prompt_format = None  # no flag, no record: chosen from the tokenizer once it has loaded
    if decided is not None:
        eval_args.prompt_template = decided
    else:
        choose_prompt_format = partial(choose_prompt_template, None, models)
    with writing_into(eval_args.output_dir):
        report = run_evaluation(model_args, eval_args, settings, choose_prompt_format)
    for result in report["results"]:
        print(
            f"{result['name']}: n={result['num_examples']} rougeL={result['rougeL']['mean']:.2f}"
            f"±{result['rougeL']['std']:.2f} exact_match={result['exact_match']['mean']:.2f}"
        )
    print(output_summary(eval_args, report))
    return 0
