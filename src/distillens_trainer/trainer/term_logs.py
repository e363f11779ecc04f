"""The objective's terms between two logs: what ``DistillLensTrainer.log`` and its evaluation add to the metrics.

Training terms are summed per optimizer step, already normalised by the accumulation window, and logged as their
mean over the steps since the last log (the window ``loss`` covers); evaluation terms are summed per response
token and logged as means over every token of the evaluation set, with ``{prefix}_loss`` = Σ weight · term. Each
pop is one cross-process reduction.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping

import torch

from ..loss.spec import ObjectiveOutput

Reduce = Callable[[torch.Tensor], torch.Tensor]


class TermLogs:
    """Running sums of the objective's terms (``ObjectiveOutput.term_sums``), training and evaluation apart.

    Args:
        device: where the sums live (the training device: the reductions run there).
        term_weights: each term's weight in the objective, for ``{prefix}_loss``.
    """

    def __init__(self, device: torch.device, term_weights: Mapping[str, float]) -> None:
        self.term_weights = term_weights
        self.train_totals: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        self.train_steps: set[int] = set()
        self.eval_sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        self.eval_tokens = torch.zeros((), device=device)

    def record(self, result: ObjectiveOutput, *, training: bool, step: int, scale: int) -> None:
        """Add one micro-batch's terms: per step in training (``scale``: the loss's cross-process factor), per
        token in evaluation."""
        if training:
            self.train_steps.add(step)
            for name, value in result.term_sums.items():
                self.train_totals[name] += value * (scale / result.denominator)
        else:
            for name, value in result.term_sums.items():
                self.eval_sums[name] += value
            self.eval_tokens += result.num_tokens

    def clear_train(self) -> None:
        """Forget the training terms not logged yet (a new ``train()`` call)."""
        self.train_totals.clear()
        self.train_steps.clear()

    def clear_eval(self) -> None:
        """Forget evaluation terms (an evaluation starts)."""
        self.eval_sums.clear()
        self.eval_tokens.zero_()

    def pop_train(self, reduce_mean: Reduce) -> dict[str, float]:
        """Per-term means over the optimizer steps since the last log, averaged across processes."""
        if not self.train_totals:
            return {}
        names = sorted(self.train_totals)
        totals = reduce_mean(torch.stack([self.train_totals[name] for name in names]))
        num_steps = max(len(self.train_steps), 1)
        self.clear_train()
        return {name: value / num_steps for name, value in zip(names, totals.tolist())}

    def pop_eval(self, prefix: str, reduce_sum: Reduce) -> dict[str, float]:
        """Per-term means over every response token of the evaluation set, across processes, and ``loss``.

        ``{prefix}_loss`` is the objective over the same tokens, Σ weight · term, so it equals the weighted sum of
        the logged terms and does not depend on the evaluation batch size (``Trainer`` averages batch means).
        """
        if not self.eval_sums:
            return {}
        names = sorted(self.eval_sums)
        sums = reduce_sum(torch.stack([self.eval_sums[name] for name in names] + [self.eval_tokens]))
        num_tokens = max(sums[-1].item(), 1.0)
        self.clear_eval()
        means = {name: value / num_tokens for name, value in zip(names, sums[:-1].tolist())}
        means["loss"] = sum(
            self.term_weights[name] * value
            for name, value in means.items()
            if self.term_weights.get(name, 0) > 0
        )
        return {f"{prefix}_{name}": value for name, value in means.items()}
