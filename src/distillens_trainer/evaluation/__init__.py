"""Generation-quality evaluation with the MiniLLM protocol used by the DistillLens paper.

The protocol: build the Alpaca prompt for every example, sample a response per seed
(temperature 1.0, top-p 1.0, top-k 0, no-repeat-ngram 6, 256 new tokens, prompts capped at 256
tokens, seeds 10/20/30/40/50), score each response with ROUGE-L against all references, and
report the mean and standard deviation over seeds.

Scoring follows MiniLLM's ``rouge_metric.py`` exactly:

- ROUGE-L is the ``rouge_score`` F-measure with the Porter stemmer and the package's default
  tokenizer (lowercase, non-alphanumeric characters dropped), maximised over the references and
  multiplied by 100.
- Exact match uses the SQuAD normalisation without article removal: lowercase, remove every ASCII
  punctuation character, collapse whitespace (which also strips the ends).

One module per job: :mod:`.metrics` (scoring), :mod:`.examples` (JSONL files), :mod:`.generation`
(:class:`GenerationSettings`, the one place the generation settings live, and :func:`generate_responses`),
:mod:`.arguments` (:class:`EvalArguments`, parsed alongside a :class:`GenerationSettings`), :mod:`.runner`
(the file runner behind ``distillens eval``: :func:`run_evaluation`, :func:`evaluate_files`) and :mod:`.callback` (:class:`RougeEvalCallback`, which adds
``eval_rougeL`` / ``eval_exact_match`` to the Trainer's evaluation metrics so they can drive
``metric_for_best_model``). ``python -m distillens_trainer.evaluation`` is ``distillens eval``.
"""

from __future__ import annotations

from .arguments import PAPER_SEEDS, EvalArguments
from .callback import RougeEvalCallback
from .examples import load_eval_examples, references_of, unique_file_names
from .generation import (
    GenerationSettings,
    build_generation_config,
    cut_at_eos,
    encode_prompt,
    generate_responses,
    left_pad,
    only_generation_config,
)
from .metrics import (
    EXACT_MATCH_DESCRIPTION,
    ROUGE_DESCRIPTION,
    exact_match,
    mean_and_std,
    normalize_answer,
    rouge_l,
    score_responses,
)
from .runner import (
    GENERATIONS_SUFFIX,
    REPORT_FILENAME,
    evaluate_file,
    evaluate_files,
    output_summary,
    protocol_of,
    run_evaluation,
)

__all__ = [
    "EXACT_MATCH_DESCRIPTION",
    "GENERATIONS_SUFFIX",
    "PAPER_SEEDS",
    "REPORT_FILENAME",
    "ROUGE_DESCRIPTION",
    "EvalArguments",
    "GenerationSettings",
    "RougeEvalCallback",
    "build_generation_config",
    "cut_at_eos",
    "encode_prompt",
    "evaluate_file",
    "evaluate_files",
    "exact_match",
    "generate_responses",
    "left_pad",
    "load_eval_examples",
    "mean_and_std",
    "normalize_answer",
    "only_generation_config",
    "output_summary",
    "protocol_of",
    "references_of",
    "rouge_l",
    "run_evaluation",
    "score_responses",
    "unique_file_names",
]
