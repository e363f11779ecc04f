"""Scoring the demo's models: greedy generation (exact match, ROUGE-L) and the per-layer logit-lens
divergence from the teacher."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .arguments import LENS_EVAL_DIVERGENCE
from .suite import prompt_of, score_answer


def default_max_new_tokens(examples: Sequence[Mapping[str, str]], tokenizer: Any) -> int:
    """The longest reference answer in tokens, plus room for EOS and a little overshoot."""
    lengths = [len(tokenizer(example["output"], add_special_tokens=False).input_ids) for example in examples]
    return max(lengths, default=8) + 4


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
    from ..evaluation.generation import generate_responses
    from ..evaluation.metrics import rouge_l

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

    Returns ``{"pairs": [[s, t], ...], "divergence": [...], "final": ..., "student_ce": ..., "teacher_ce": ...}``;
    the last pair is the two models' final layers, i.e. the divergence of their output distributions.
    """
    from ..data.collation import DataCollatorForCompletionOnly
    from ..diagnostics.profile import same_depth_pairs
    from ..lens import LogitLens
    from ..model_facts import model_vocab_size
    from ..objective import DistillLensObjective
    from ..objective_spec import ObjectiveSpec, lens_term_name
    from ..teacher import shared_vocab_size

    student_lens, teacher_lens = LogitLens(student), LogitLens(teacher)
    pairs = same_depth_pairs(student_lens.num_layers, teacher_lens.num_layers)
    spec = ObjectiveSpec(
        ce_weight=1.0, kd_weight=1.0, kd_divergence=divergence, lens_weight=1.0, lens_divergence=divergence
    )
    objective = DistillLensObjective(
        spec,
        vocab_size=shared_vocab_size(student, teacher, tokenizer),
        student_lens=student_lens,
        teacher_lens=teacher_lens,
        layer_map=pairs,
    )
    teacher_ce = DistillLensObjective(
        ObjectiveSpec(ce_weight=1.0, kd_weight=0.0, lens_weight=0.0), vocab_size=model_vocab_size(teacher)
    )
    collator = DataCollatorForCompletionOnly(tokenizer)
    was_training = student.training, teacher.training
    student.eval()
    teacher.eval()
    device = next(student.parameters()).device
    sums: dict[str, float] = {}
    teacher_ce_sum, num_tokens = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[index] for index in range(start, min(start + batch_size, len(dataset)))])
        batch = {key: value.to(device) for key, value in batch.items()}
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        student_out = student(**inputs, output_hidden_states=True, use_cache=False)
        teacher_out = teacher(**inputs, output_hidden_states=True, use_cache=False)
        result = objective(
            batch["labels"],
            student_logits=student_out.logits,
            teacher_logits=teacher_out.logits,
            student_hidden_states=student_out.hidden_states,
            teacher_hidden_states=teacher_out.hidden_states,
        )
        teacher_ce_sum += float(
            teacher_ce(batch["labels"], student_logits=teacher_out.logits).term_sums["ce_loss"]
        )
        for name, value in result.term_sums.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        num_tokens += result.num_tokens
    student.train(was_training[0])
    teacher.train(was_training[1])
    tokens = max(num_tokens, 1)
    return {
        "divergence_name": divergence,
        "pairs": [list(pair) for pair in pairs],
        "divergence": [round(sums[lens_term_name(s, t)] / tokens, 5) for s, t in pairs],
        "final": round(sums["kd_loss"] / tokens, 5),
        "student_ce": round(sums["ce_loss"] / tokens, 5),
        "teacher_ce": round(teacher_ce_sum / tokens, 5),
        "num_tokens": num_tokens,
    }
