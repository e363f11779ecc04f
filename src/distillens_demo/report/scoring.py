"""Scoring the demo's models: greedy generation (exact match, ROUGE-L) and the per-layer logit-lens
divergence from the teacher."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from distillens_trainer.data.collation import DataCollatorForCompletionOnly
from distillens_trainer.diagnostics.profile import (
    LensProfileAccumulator,
    accumulate_batches,
    same_depth_pairs,
)
from distillens_trainer.evaluation.generation import generate_responses
from distillens_trainer.evaluation.metrics import rouge_l
from distillens_trainer.loss.lens import LogitLens
from distillens_trainer.teacher.frozen import shared_vocab_size

from ..arguments import LENS_EVAL_DIVERGENCE
from ..data.suite import prompt_of, score_answer


def evaluate_generation(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, str]],
    *,
    prompt_template: str,
    batch_size: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """Greedy answers to ``examples`` scored with exact match and ROUGE-L (both 0-100), overall and per task."""
    prompts = [prompt_of(example, prompt_template) for example in examples]
    answers = generate_responses(
        model,
        tokenizer,
        prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_prompt_length=256,
        do_sample=False,
        no_repeat_ngram_size=0,
        seed=0,
        show_progress=sys.stderr.isatty(),
    )
    records = []
    for example, answer in zip(examples, answers):
        records.append(
            {
                "task": example["task"],
                "instruction": example["instruction"],
                "input": example["input"],
                "reference": example["output"],
                "generation": answer,
                "exact_match": 100.0 if score_answer(answer, example["output"]) else 0.0,
                "rougeL": rouge_l(answer, [example["output"]]),
            }
        )
    per_task: dict[str, dict[str, float]] = {}
    for task in dict.fromkeys(example["task"] for example in examples):
        rows = [record for record in records if record["task"] == task]
        per_task[task] = {
            "exact_match": round(statistics.fmean(row["exact_match"] for row in rows), 2),
            "rougeL": round(statistics.fmean(row["rougeL"] for row in rows), 2),
            "n": len(rows),
        }
    return {
        "exact_match": round(statistics.fmean(row["exact_match"] for row in records), 2),
        "rougeL": round(statistics.fmean(row["rougeL"] for row in records), 2),
        "num_examples": len(records),
        "per_task": dict(sorted(per_task.items())),
        "records": records,
    }


@torch.no_grad()
def lens_divergence_profile(
    student: Any,
    teacher: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    batch_size: int = 64,
    divergence: str = LENS_EVAL_DIVERGENCE,
) -> dict[str, Any]:
    """Mean per-token divergence, on response tokens, between each student layer and the teacher layer at the
    same relative depth, both read through their own logit lens (final norm + LM head).

    Computed by the profile library behind ``distillens lens`` and ``lens_eval_profile``
    (:class:`~distillens_trainer.diagnostics.profile.LensProfileAccumulator` on the same-depth pairs).
    Returns ``{"divergence_name", "pairs": [[s, t], ...], "divergence": [...], "final", "student_ce",
    "teacher_ce", "num_tokens"}``; the last pair is the two models' final layers, so ``final`` is the divergence
    of their output distributions; ``student_ce`` / ``teacher_ce`` are each model's mean cross-entropy of the
    reference response tokens.
    """
    student_lens, teacher_lens = LogitLens(student), LogitLens(teacher)
    pairs = same_depth_pairs(student_lens.num_layers, teacher_lens.num_layers)
    accumulator = LensProfileAccumulator(
        student_lens,
        teacher_lens,
        shared_vocab_size(student, teacher, tokenizer),
        pairs=pairs,
        divergences=[divergence],
        layer_statistics=False,  # only the pairs and the cross-entropies are reported
    )
    collator = DataCollatorForCompletionOnly(tokenizer)
    device = next(student.parameters()).device
    batches = (
        {key: value.to(device) for key, value in collator(rows).items()}
        for rows in (
            [dataset[index] for index in range(start, min(start + batch_size, len(dataset)))]
            for start in range(0, len(dataset), batch_size)
        )
    )
    was_training = student.training, teacher.training
    student.eval()
    teacher.eval()
    try:
        accumulate_batches(accumulator, student, teacher, batches)
    finally:
        student.train(was_training[0])
        teacher.train(was_training[1])
    means = accumulator.means()
    per_pair = [round(value, 5) for value in means["pairs"][divergence]]
    return {
        "divergence_name": divergence,
        "pairs": [list(pair) for pair in pairs],
        "divergence": per_pair,
        "final": per_pair[-1],  # the pair (L_S, L_T): the two models' output distributions
        "student_ce": round(means["final_ce"]["student"], 5),
        "teacher_ce": round(means["final_ce"]["teacher"], 5),
        "num_tokens": means["num_tokens"],
    }
