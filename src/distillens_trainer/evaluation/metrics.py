"""The MiniLLM scoring protocol: ROUGE-L, exact match, and mean/std over seeds."""

from __future__ import annotations

import statistics
import string
from collections.abc import Sequence
from functools import lru_cache

from rouge_score import rouge_scorer

ROUGE_DESCRIPTION = (
    "ROUGE-L F-measure x100 (rouge_score, Porter stemmer, default tokenizer), max over references"
)
EXACT_MATCH_DESCRIPTION = (
    "100 if the normalised prediction equals a normalised reference (lowercase, ASCII punctuation "
    "removed, whitespace collapsed), else 0"
)


@lru_cache(maxsize=1)
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    """The shared ROUGE-L scorer, configured like MiniLLM (stemming on, default tokenizer)."""
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _check_references(references: Sequence[str]) -> None:
    """Reject an empty reference list, which would make the max over references undefined."""
    if isinstance(references, str) or len(references) == 0:
        raise ValueError(
            "references: expected a non-empty list of strings; wrap a single reference in a list"
        )


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (0-100) of `prediction`, maximised over `references`.

    Uses ``rouge_score`` with ``use_stemmer=True`` as in MiniLLM's evaluation. Text without any
    ASCII letter or digit tokenises to nothing and scores 0, even against itself.
    """
    _check_references(references)
    scorer = _rouge_l_scorer()
    return max(
        100.0 * scorer.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in references
    )


_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: lowercase, drop ASCII punctuation, collapse and strip whitespace."""
    return " ".join(text.lower().translate(_PUNCTUATION_TABLE).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100.0 if the normalised `prediction` equals any normalised reference, else 0.0."""
    _check_references(references)
    normalized = normalize_answer(prediction)
    return 100.0 if any(normalized == normalize_answer(ref) for ref in references) else 0.0


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for a single value) of per-seed scores."""
    if not values:
        raise ValueError("values: expected at least one per-seed score")
    return statistics.fmean(values), statistics.pstdev(values)


def score_responses(responses: Sequence[str], references: Sequence[Sequence[str]]) -> list[dict[str, float]]:
    """Per-example rougeL and exact_match scores."""
    return [
        {"rougeL": rouge_l(response, refs), "exact_match": exact_match(response, refs)}
        for response, refs in zip(responses, references)
    ]
