"""Generation metrics during training: ``eval_rougeL`` / ``eval_exact_match`` for the Trainer."""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from ..data.arguments import PROMPT_TEMPLATES
from ..data.prompts import build_prompt
from .examples import check_example, load_eval_examples, references_of
from .generation import GenerationSettings, generate_responses
from .metrics import score_responses

logger = logging.getLogger(__name__)

# The callback's default: one deterministic greedy pass, otherwise the paper's settings.
GREEDY = GenerationSettings(do_sample=False)


def _broadcast_from_main(values: dict[str, float]) -> dict[str, float]:
    """Rank 0's values on every rank (a no-op outside torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    if torch.distributed.get_world_size() == 1:
        return values
    box = [values]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class RougeEvalCallback(TrainerCallback):
    """Add generation metrics (`eval_rougeL`, `eval_exact_match`) to every Trainer evaluation.

    On each `on_evaluate` the callback generates responses for the first `num_samples` dev
    examples, scores them, and writes the scores into the Trainer's `metrics` dict in place, so
    `metric_for_best_model="eval_rougeL"` and `load_best_model_at_end=True` work. The scores are
    also added to the latest evaluation entry of `state.log_history`. Logging integrations
    (TensorBoard, W&B) have already received that evaluation's logs when the callback runs, so
    they do not see these two values.

    Defaults favour speed: greedy decoding (one deterministic pass) with the paper's
    no-repeat-ngram 6 and token limits. With sampling, `seed` fixes the RNG for each evaluation.

    Distributed training: every rank generates on the full subset (so all ranks take part in each
    forward pass, as DeepSpeed ZeRO-3 requires; `synced_gpus` is set automatically there), and
    rank 0's scores are broadcast so every rank records the same metrics and picks the same best
    checkpoint. Register this callback before any callback that reads these metrics, such as
    `EarlyStoppingCallback`.
    """

    def __init__(
        self,
        tokenizer: Any,
        eval_examples: Sequence[dict[str, Any]] | str | os.PathLike[str],
        num_samples: int | None = 200,
        *,
        prompt_template: str = "alpaca",
        settings: GenerationSettings = GREEDY,
        seed: int = 10,
        metric_prefix: str = "eval",
        show_progress: bool = False,
        **overrides: Any,
    ) -> None:
        """Prepare prompts and references for the first `num_samples` examples (all when None).

        `settings` (default: greedy, otherwise the paper's protocol) has its fields replaced by the keyword
        `overrides` (field names of :class:`GenerationSettings`, e.g. ``max_new_tokens=64``).
        """
        self.settings = settings.with_overrides(**overrides)
        if num_samples is not None and num_samples < 1:
            raise ValueError("num_samples: must be >= 1 or None (all examples); pass a positive number")
        if isinstance(eval_examples, str | os.PathLike):
            examples = load_eval_examples(eval_examples, num_samples)
        else:
            examples = list(eval_examples)[:num_samples]
            for index, example in enumerate(examples):
                check_example(example, f"eval_examples[{index}]")
        if not examples:
            raise ValueError("eval_examples: got no examples; pass a non-empty list or JSONL path")
        if prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(
                f"prompt_template: got {prompt_template!r}; choose one of {', '.join(PROMPT_TEMPLATES)}"
            )
        self.tokenizer = tokenizer
        self.prompts = [build_prompt(example, tokenizer, prompt_template) for example in examples]
        self.references = [references_of(example) for example in examples]
        self.metric_prefix = metric_prefix
        self.seed = seed
        self.show_progress = show_progress

    def compute_metrics(self, model: Any) -> dict[str, float]:
        """Generate on the dev subset and return `{<prefix>_rougeL, <prefix>_exact_match}`."""
        responses = generate_responses(
            model,
            self.tokenizer,
            self.prompts,
            self.settings,
            seed=self.seed,
            show_progress=self.show_progress,
        )
        scores = score_responses(responses, self.references)
        return {
            f"{self.metric_prefix}_{metric}": statistics.fmean(score[metric] for score in scores)
            for metric in ("rougeL", "exact_match")
        }

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        """Add the generation metrics to `metrics` (in place) and to the last eval log entry."""
        if model is None or metrics is None:
            logger.warning("RougeEvalCallback: no model or metrics passed to on_evaluate; skipping")
            return control
        values = _broadcast_from_main(self.compute_metrics(model))
        logged_keys = set(metrics)
        metrics.update(values)
        for entry in reversed(state.log_history):  # the entry Trainer.log wrote for this evaluation
            if logged_keys & set(entry):
                entry.update(values)
                break
        return control
