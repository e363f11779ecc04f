"""Per-layer logit-lens statistics of a student (and a teacher) on response tokens.

For every response token, each layer's hidden state is read through the model's own :class:`LogitLens`
and turned into fp32 log-probabilities over the shared vocabulary once; from those the accumulator sums

- the divergence between chosen (student layer, teacher layer) pairs — every pair for the heatmap;
- each layer's entropy (nats) and whether its top-1 token equals the model's final top-1 token;
- each layer's divergence from the model's own final distribution;
- each model's cross-entropy of the target (response) token under its final layer, i.e. its own output
  distribution over the shared vocabulary (read from the same log-probabilities, at no extra cost).

Work is done per chunk of ``chunk_size`` tokens, so at most ``[L + 1, chunk_size, V]`` log-probabilities
per model exist at a time. With ``layer_statistics=False`` only the pair divergences and the cross-entropies are
summed, from the log-probabilities of just the layers the pairs read and the final ones. Layer indices follow the
``hidden_states`` convention (0 = embedding output, ``L`` = the last block's output, which equals the model's own
logits through the lens).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..divergences import divergence_from_log_probs, log_probs
from ..layer_map import LayerPair, proportional_teacher_layer
from ..lens import LogitLens
from ..model_facts import forward_accepts, with_position_ids
from ..response_tokens import response_mask, select_response

DEFAULT_CHUNK_SIZE = 32


def all_pairs(student_num_layers: int, teacher_num_layers: int) -> list[LayerPair]:
    """Every (student, teacher) pair of ``hidden_states`` indices, 0 included, row-major."""
    return [(s, t) for s in range(student_num_layers + 1) for t in range(teacher_num_layers + 1)]


def same_depth_pairs(student_num_layers: int, teacher_num_layers: int) -> list[LayerPair]:
    """Each student layer 1..L_S with the teacher layer at the same relative depth, floor(s·L_T/L_S)."""
    return [
        (s, proportional_teacher_layer(s, student_num_layers, teacher_num_layers))
        for s in range(1, student_num_layers + 1)
    ]


def layer_log_probs(
    lens: LogitLens,
    hidden_states: Sequence[torch.Tensor],
    vocab_size: int,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """``L + 1`` tensors ``[c, d]`` (one per ``hidden_states`` index) -> ``[n, c, V]`` fp32 log-probs of the
    ``n`` chosen ``layers`` (default every index, ``n = L + 1``), in that order."""
    layers = range(len(hidden_states)) if layers is None else layers
    return torch.stack([log_probs(lens(hidden_states[index], index)[..., :vocab_size]) for index in layers])


@dataclass
class ModelLayerSums:
    """Sums over tokens for one model: each per-layer field is ``[L + 1]``; ``final_ce`` is a scalar, the sum of
    ``-log p_final(target)`` (the model's cross-entropy on the response tokens)."""

    entropy: torch.Tensor
    top1_agreement: torch.Tensor
    divergence_to_final: dict[str, torch.Tensor]
    final_ce: torch.Tensor

    @classmethod
    def zeros(cls, num_layers: int, divergences: Sequence[str], device: torch.device) -> ModelLayerSums:
        def zero(size: tuple[int, ...] = (num_layers + 1,)) -> torch.Tensor:
            return torch.zeros(size, dtype=torch.float64, device=device)

        return cls(zero(), zero(), {name: zero() for name in divergences}, zero(()))

    def tensors(self) -> list[torch.Tensor]:
        return [
            self.entropy,
            self.top1_agreement,
            *self.divergence_to_final.values(),
            self.final_ce.reshape(1),
        ]


@dataclass
class LensProfileAccumulator:
    """Sums of per-layer lens statistics over response tokens; read them with :meth:`means`.

    Args:
        student_lens / teacher_lens: the models' lenses; ``teacher_lens=None`` profiles the student alone and
            compares it with itself (the "teacher" side is then the student's own layers).
        vocab_size: logits are compared on ``[..., :vocab_size]`` (the shared real vocabulary).
        pairs: (student, teacher) layer pairs whose divergence is summed; default every pair.
        divergences: names from :mod:`distillens_trainer.divergences` (student first, teacher second).
        chunk_size: tokens whose log-probabilities are held at once.
        layer_statistics: also sum each layer's entropy, top-1 agreement and divergence to the final layer
            (``means()["student"]`` / ``["teacher"]``); False reads only the layers the pairs use and the final
            ones (the pair divergences and ``final_ce`` are the same), and those entries are None.
    """

    student_lens: LogitLens
    teacher_lens: LogitLens | None
    vocab_size: int
    pairs: list[LayerPair] | None = None
    divergences: Sequence[str] = ("jsd",)
    jsd_beta: float = 0.5
    chunk_size: int = DEFAULT_CHUNK_SIZE
    layer_statistics: bool = True
    num_tokens: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size} must be at least 1.")
        self.divergences = list(self.divergences)
        reference = self.reference_lens
        if self.pairs is None:
            self.pairs = all_pairs(self.student_lens.num_layers, reference.num_layers)
        device = self.student_lens.head.weight.device
        self.num_tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.student = ModelLayerSums.zeros(self.student_lens.num_layers, self.divergences, device)
        self.teacher = (
            ModelLayerSums.zeros(reference.num_layers, self.divergences, device)
            if self.teacher_lens is not None
            else None
        )
        self.pair_sums = {
            name: torch.zeros(len(self.pairs), dtype=torch.float64, device=device)
            for name in self.divergences
        }
        # The hidden_states indices read through each lens (every one, or the paired ones and the final one).
        self._student_layers = self._layers_read(self.student_lens.num_layers, [s for s, _ in self.pairs])
        self._teacher_layers = self._layers_read(reference.num_layers, [t for _, t in self.pairs])
        student_row = {layer: row for row, layer in enumerate(self._student_layers)}
        teacher_row = {layer: row for row, layer in enumerate(self._teacher_layers)}
        # Student row -> (positions in self.pairs, teacher rows), so one student row meets all its partners.
        self._rows: dict[int, tuple[list[int], list[int]]] = {}
        for position, (student_layer, teacher_layer) in enumerate(self.pairs):
            positions, teacher_rows = self._rows.setdefault(student_row[student_layer], ([], []))
            positions.append(position)
            teacher_rows.append(teacher_row[teacher_layer])

    def _layers_read(self, num_layers: int, paired: list[int]) -> list[int]:
        """Sorted ``hidden_states`` indices whose log-probabilities a chunk needs; the last is the final layer."""
        if self.layer_statistics:
            return list(range(num_layers + 1))
        return sorted({*paired, num_layers})

    @property
    def reference_lens(self) -> LogitLens:
        """The lens of the compared model: the teacher's, or the student's own when profiling it alone."""
        return self.teacher_lens if self.teacher_lens is not None else self.student_lens

    def add(
        self,
        student_hidden_states: Sequence[torch.Tensor],
        teacher_hidden_states: Sequence[torch.Tensor] | None,
        labels: torch.Tensor,
        max_tokens: int | None = None,
    ) -> int:
        """Add the response tokens of one batch (at most ``max_tokens`` of them); returns how many were added.

        Args:
            student_hidden_states / teacher_hidden_states: HF ``hidden_states`` tuples, each ``[B, T, d]``
                (the teacher's is ignored, and may be None, when profiling the student alone).
            labels: ``[B, T]`` unshifted, -100 outside the responses; the targets of ``final_ce``, which must lie
                in the compared vocabulary ``[0, vocab_size)``.
        """
        mask = response_mask(labels)
        targets = labels[:, 1:][mask]  # [N], the token each response position predicts
        if targets.numel() and bool(((targets < 0) | (targets >= self.vocab_size)).any()):
            raise ValueError(
                f"a response label lies outside the compared vocabulary [0, {self.vocab_size}): "
                "check vocab_size (the shared real vocabulary) against the tokenizer."
            )
        student_tokens = [select_response(hidden, mask) for hidden in student_hidden_states]  # [N, d_s] each
        teacher_tokens = (
            [select_response(hidden, mask) for hidden in teacher_hidden_states]
            if self.teacher_lens is not None
            else None
        )
        num_tokens = student_tokens[0].shape[0]
        if max_tokens is not None:
            num_tokens = min(num_tokens, max(max_tokens, 0))
        for start in range(0, num_tokens, self.chunk_size):
            stop = min(start + self.chunk_size, num_tokens)
            self._add_chunk(
                [hidden[start:stop] for hidden in student_tokens],
                [hidden[start:stop] for hidden in teacher_tokens] if teacher_tokens is not None else None,
                targets[start:stop],
            )
        self.num_tokens += num_tokens
        return num_tokens

    @torch.no_grad()
    def _add_chunk(
        self,
        student_hidden: list[torch.Tensor],
        teacher_hidden: list[torch.Tensor] | None,
        targets: torch.Tensor,
    ) -> None:
        student_lp = layer_log_probs(
            self.student_lens, student_hidden, self.vocab_size, self._student_layers
        )  # [n_S, c, V], n_S = L_S + 1 with layer statistics
        targets = targets.to(student_lp.device)  # [c]
        self._add_model_sums(self.student, student_lp, targets)
        if teacher_hidden is None:
            teacher_lp = student_lp
        else:
            teacher_lp = layer_log_probs(
                self.teacher_lens, teacher_hidden, self.vocab_size, self._teacher_layers
            )
            teacher_lp = teacher_lp.to(student_lp.device)  # [n_T, c, V], beside the student's
            self._add_model_sums(self.teacher, teacher_lp, targets)
        for student_row, (positions, teacher_rows) in self._rows.items():
            partners = teacher_lp[teacher_rows]  # [P, c, V]
            for name in self.divergences:
                per_token = divergence_from_log_probs(
                    name, student_lp[student_row].unsqueeze(0), partners, beta=self.jsd_beta
                )  # [P, c]
                self.pair_sums[name][positions] += per_token.sum(dim=-1).double()

    def _add_model_sums(self, sums: ModelLayerSums, layer_lp: torch.Tensor, targets: torch.Tensor) -> None:
        if self.layer_statistics:
            _add_layer_sums(sums, layer_lp, targets, self.jsd_beta)
        else:
            _add_final_ce(sums, layer_lp[-1], targets)

    def tensors(self) -> list[torch.Tensor]:
        """Every running sum, in a fixed order (for a cross-process reduction)."""
        teacher = self.teacher.tensors() if self.teacher is not None else []
        return [self.num_tokens.reshape(1), *self.student.tensors(), *teacher, *self.pair_sums.values()]

    def reduce_(self, reduce_sum) -> None:
        """Replace every sum by ``reduce_sum`` of it (e.g. a sum across processes), in one call."""
        tensors = self.tensors()
        flat = reduce_sum(torch.cat([tensor.flatten() for tensor in tensors]))
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()

    def means(self) -> dict:
        """Per-token means as plain lists: ``{"num_tokens", "student", "teacher", "pairs", "final_ce"}``.

        ``student``/``teacher``: ``{"entropy", "top1_agreement", "divergence_to_final": {name: [...]}}``,
        one value per layer 0..L (``teacher`` is None when profiling the student alone; both are None without
        ``layer_statistics``);
        ``pairs``: ``{name: [...]}``, one value per entry of ``self.pairs``;
        ``final_ce``: ``{"student": ..., "teacher": ...}``, each model's mean cross-entropy (nats) of the
        response tokens under its own output distribution over the shared vocabulary (``teacher`` None alone).
        """
        count = max(float(self.num_tokens), 1.0)

        def per_token(values: torch.Tensor) -> list[float]:
            return (values / count).tolist()

        def model(sums: ModelLayerSums | None) -> dict | None:
            if sums is None or not self.layer_statistics:
                return None
            return {
                "entropy": per_token(sums.entropy),
                "top1_agreement": per_token(sums.top1_agreement),
                "divergence_to_final": {
                    name: per_token(value) for name, value in sums.divergence_to_final.items()
                },
            }

        return {
            "num_tokens": int(self.num_tokens),
            "student": model(self.student),
            "teacher": model(self.teacher),
            "pairs": {name: per_token(value) for name, value in self.pair_sums.items()},
            "final_ce": {
                "student": float(self.student.final_ce) / count,
                "teacher": float(self.teacher.final_ce) / count if self.teacher is not None else None,
            },
        }


def _add_layer_sums(
    sums: ModelLayerSums, layer_lp: torch.Tensor, targets: torch.Tensor, jsd_beta: float
) -> None:
    """Add one chunk's entropy, top-1 agreement, divergence-to-final and final-layer CE sums; ``layer_lp`` is
    ``[L + 1, c, V]``, ``targets`` ``[c]``."""
    sums.entropy += -(layer_lp.exp() * layer_lp).sum(dim=-1).sum(dim=-1).double()
    top1 = layer_lp.argmax(dim=-1)  # [L + 1, c]
    sums.top1_agreement += (top1 == top1[-1:]).sum(dim=-1).double()
    final = layer_lp[-1:]
    for name, total in sums.divergence_to_final.items():
        total += divergence_from_log_probs(name, layer_lp, final, beta=jsd_beta).sum(dim=-1).double()
    _add_final_ce(sums, layer_lp[-1], targets)


def _add_final_ce(sums: ModelLayerSums, final_lp: torch.Tensor, targets: torch.Tensor) -> None:
    """Add ``-log p_final(target)`` of one chunk; ``final_lp`` is ``[c, V]``, ``targets`` ``[c]``."""
    sums.final_ce -= final_lp.gather(-1, targets[:, None]).sum().double()


def hidden_states_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The ``hidden_states`` tuple of one forward pass (no grad, no cache) on a collated batch, on the model's device."""

    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in batch.items() if key != "labels"}
    inputs = with_position_ids(inputs, forward_accepts(model, "position_ids"))
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True, use_cache=False).hidden_states


def accumulate_batches(
    accumulator: LensProfileAccumulator,
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    max_tokens: int | None = None,
    progress=None,
) -> LensProfileAccumulator:
    """Run both models on each batch (already on their device) and add its response tokens.

    Stops once ``max_tokens`` tokens were added; ``progress`` (a tqdm bar) is advanced by tokens.
    """
    for batch in batches:
        remaining = None if max_tokens is None else max_tokens - int(accumulator.num_tokens)
        if remaining is not None and remaining <= 0:
            break
        student_hidden = hidden_states_of(student, batch)
        teacher_hidden = hidden_states_of(teacher, batch) if teacher is not None else None
        added = accumulator.add(student_hidden, teacher_hidden, batch["labels"], max_tokens=remaining)
        if progress is not None:
            progress.update(added)
    return accumulator


# --------------------------------------------------------------------------------------------- during training
@torch.no_grad()
def evaluation_lens_profile(trainer: Any, dataloader: Any, prefix: str = "eval") -> dict[str, float]:
    """The per-layer metrics of a :class:`~distillens_trainer.DistillLensTrainer` on ``dataloader`` (``lens_eval_profile``).

    ``{prefix}_lens_profile/s{i}``: the student's layer ``i`` against the teacher layer at the same relative depth,
    in the training's ``lens_divergence``; ``{prefix}_lens_entropy/s{i}`` / ``/t{j}``: entropy in nats of each
    layer's lens distribution; per response token of the evaluation set, summed across processes. One extra
    forward pass of both models over the evaluation set.
    """
    args = trainer.args
    student_lens = trainer.student_lens or LogitLens(trainer.model, final_norm=args.lens_final_norm)
    teacher_lens = trainer.teacher_lens or LogitLens(trainer.teacher_model, final_norm=args.lens_final_norm)
    accumulator = LensProfileAccumulator(
        student_lens,
        teacher_lens,
        trainer.vocab_size,
        pairs=same_depth_pairs(student_lens.num_layers, teacher_lens.num_layers),
        divergences=[args.lens_divergence],
        jsd_beta=args.jsd_beta,
    )
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        batches = (trainer._prepare_inputs(batch) for batch in dataloader)
        accumulate_batches(accumulator, trainer.model, trainer.teacher_model, batches)
    finally:
        trainer.model.train(was_training)
    accumulator.reduce_(lambda flat: trainer.accelerator.reduce(flat, reduction="sum"))
    means = accumulator.means()
    metrics = {
        f"{prefix}_lens_profile/s{s}": value
        for (s, _), value in zip(accumulator.pairs, means["pairs"][args.lens_divergence])
    }
    for side, letter in (("student", "s"), ("teacher", "t")):
        for layer, value in enumerate(means[side]["entropy"]):
            metrics[f"{prefix}_lens_entropy/{letter}{layer}"] = value
    return metrics
