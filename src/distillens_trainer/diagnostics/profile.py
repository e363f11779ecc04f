"""Per-layer logit-lens statistics of a student (and a teacher) on response tokens.

For every response token, each layer's hidden state is read through the model's own :class:`LogitLens`
and turned into fp32 log-probabilities over the shared vocabulary once; from those the accumulator sums

- the divergence between chosen (student layer, teacher layer) pairs — every pair for the heatmap;
- each layer's entropy (nats) and whether its top-1 token equals the model's final top-1 token;
- each layer's divergence from the model's own final distribution;
- each model's cross-entropy of the target (response) token under its final layer, i.e. its own output
  distribution over the shared vocabulary (read from the same log-probabilities, at no extra cost).

Work is done per chunk of ``chunk_size`` tokens (by default as many as
:data:`~.layer_blocks.DEFAULT_MEMORY_BUDGET_MIB` of blocks hold), on blocks allocated once and reused for every
chunk (what one chunk computes is :mod:`.layer_blocks`): per model a ``[n, chunk_size, V]`` fp32 block of
probabilities (``n`` = the layers read), one of log-probabilities (every layer where a requested divergence's
per-pair formula reads them, the KL kinds; else the final layer only), and two ``[chunk_size, V]`` work blocks. No
``[pairs, chunk, V]`` tensor is ever built. The pair divergences are computed by each divergence's ``per_pair`` formula in the registry (:mod:`distillens_trainer.loss.divergences`) from
per-layer and per-pair sums over the vocabulary (``Σ p·λ`` per layer once; per pair one row dot such as
``Σ t·λ_s``, or the JSD's mixture ``m`` in a work block, so a pair's value does not depend on which other layers
are read), each per token in fp32 and accumulated in fp64, so they equal the elementwise definitions up to fp32
rounding (a few 1e-6 nats per token at V = 49152). With ``layer_statistics=False`` only the pair divergences and
the cross-entropies are summed, from just the layers the pairs read and the final ones. Layer indices follow the
``hidden_states`` convention (0 = embedding output, ``L`` = the last block's output, which equals the model's own
logits through the lens).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..loss.compiled import CompiledOrEager
from ..loss.divergences import (
    PAPER_LENS_DIVERGENCE,
    check_divergence_name,
    divergence_record,
    mixture_entropy_sums,
)
from ..loss.layer_map import LayerPair, proportional_teacher_layer
from ..loss.lens import LogitLens
from ..loss.response_tokens import response_mask, select_response
from ..models.facts import forward_accepts, with_position_ids
from .layer_blocks import (
    DEFAULT_MEMORY_BUDGET_MIB,
    WORK_BLOCKS,
    ChunkLayers,
    chunk_size_for_budget,
    pair_divergence_sums,
    read_layers,
)

# The elements (tokens × layer pairs × V) from which compiling the JSD pass pays for itself: compiling takes 10-12 s
# here, and saves about a quarter of the eager profile's time (SmolLM2's 7 × 31 layers at V = 49,152: even at about
# 1,000 tokens, ahead from about 3,000; `distillens lens` defaults to 8,192).
AUTO_COMPILE_MIN_ELEMENTS = 3 * 10**10


def compile_pays_off(num_tokens: int, num_pairs: int, vocab_size: int) -> bool:
    """Whether compiling the JSD pass (``LensProfileAccumulator(compile=True)``) is worth its one-time cost: when the
    profile's passes over the vocabulary (tokens × pairs × V) hold at least :data:`AUTO_COMPILE_MIN_ELEMENTS`."""
    return num_tokens * num_pairs * vocab_size >= AUTO_COMPILE_MIN_ELEMENTS


def all_pairs(student_num_layers: int, teacher_num_layers: int) -> list[LayerPair]:
    """Every (student, teacher) pair of ``hidden_states`` indices, 0 included, row-major."""
    return [(s, t) for s in range(student_num_layers + 1) for t in range(teacher_num_layers + 1)]


def same_depth_pairs(student_num_layers: int, teacher_num_layers: int) -> list[LayerPair]:
    """Each student layer 1..L_S with the teacher layer at the same relative depth, floor(s·L_T/L_S)."""
    return [
        (s, proportional_teacher_layer(s, student_num_layers, teacher_num_layers))
        for s in range(1, student_num_layers + 1)
    ]


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
        divergences: names from :mod:`distillens_trainer.loss.divergences` (student first, teacher second).
        chunk_size: tokens whose log-probabilities are held at once; None (default) takes as many as
            ``memory_budget_mib`` of blocks hold (:func:`chunk_size_for_budget`).
        memory_budget_mib: the memory of a chunk's reused blocks when ``chunk_size`` is None.
        layer_statistics: also sum each layer's entropy, top-1 agreement and divergence to the final layer
            (``means()["student"]`` / ``["teacher"]``); False reads only the layers the pairs use and the final
            ones (the pair divergences and ``final_ce`` are the same), and those entries are None.
        compile: run the JSD's pass over the vocabulary (one per pair and token, most of the work with many
            pairs) through ``torch.compile`` (eager if that fails, said once): one fused pass instead of four
            eager ones, the same values up to fp32 rounding (the order of the sums differs).
    """

    student_lens: LogitLens
    teacher_lens: LogitLens | None
    vocab_size: int
    pairs: list[LayerPair] | None = None
    divergences: Sequence[str] = (PAPER_LENS_DIVERGENCE,)
    jsd_beta: float = 0.5
    chunk_size: int | None = None
    layer_statistics: bool = True
    memory_budget_mib: float = DEFAULT_MEMORY_BUDGET_MIB
    compile: bool = False
    num_tokens: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size} must be at least 1.")
        self.divergences = [check_divergence_name(name, "divergences") for name in self.divergences]
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
        # The rows of each pair in the student's and the teacher's blocks.
        self._pair_rows = (
            [student_row[s] for s, _ in self.pairs],
            [teacher_row[t] for _, t in self.pairs],
        )
        # Every layer's log-probabilities are kept only where a per-pair formula reads them; else the final one's.
        self._keeps_log_probs = any(
            divergence_record(name, "divergences").per_pair_reads_log_probs for name in self.divergences
        )
        if self.chunk_size is None:
            models = [self._student_layers] + (
                [self._teacher_layers] if self.teacher_lens is not None else []
            )
            block_rows = WORK_BLOCKS + sum(len(layers) + self._log_prob_rows(layers) for layers in models)
            self.chunk_size = chunk_size_for_budget(block_rows, self.vocab_size, self.memory_budget_mib)
        self._blocks: dict[str, torch.Tensor] = {}  # allocated at the first chunk, reused by every other
        self._mixture_sums = (
            CompiledOrEager(mixture_entropy_sums, "the lens profile's JSD pass") if self.compile else None
        )

    def _log_prob_rows(self, layers: list[int]) -> int:
        """Rows of a model's log-probability block: one per layer read, or the final layer's alone."""
        return len(layers) if self._keeps_log_probs else 1

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
        on_chunk: Callable[[int], Any] | None = None,
    ) -> int:
        """Add the response tokens of one batch (at most ``max_tokens`` of them); returns how many were added.

        Args:
            student_hidden_states / teacher_hidden_states: HF ``hidden_states`` tuples, each ``[B, T, d]``
                (the teacher's is ignored, and may be None, when profiling the student alone).
            labels: ``[B, T]`` unshifted, -100 outside the responses; the targets of ``final_ce``, which must lie
                in the compared vocabulary ``[0, vocab_size)``.
            on_chunk: called with the number of tokens of each chunk once it is added (e.g. a progress bar's
                ``update``).
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
            if on_chunk is not None:
                on_chunk(stop - start)
        self.num_tokens += num_tokens
        return num_tokens

    def _block(self, name: str, rows: int, chunk: int, device: torch.device) -> torch.Tensor:
        """The reused fp32 block ``name`` (``[rows, chunk_size, V]``), first ``chunk`` tokens: ``[rows, chunk, V]``."""
        block = self._blocks.get(name)
        if block is None or block.device != device:
            assert self.chunk_size is not None
            block = torch.empty(rows, self.chunk_size, self.vocab_size, dtype=torch.float32, device=device)
            self._blocks[name] = block
        return block[:, :chunk]

    @torch.no_grad()
    def _add_chunk(
        self,
        student_hidden: list[torch.Tensor],
        teacher_hidden: list[torch.Tensor] | None,
        targets: torch.Tensor,
    ) -> None:
        chunk = targets.shape[0]
        device = self.student_lens.head.weight.device
        work = self._block("work", WORK_BLOCKS, chunk, device)  # [2, c, V]
        student = read_layers(
            self.student_lens, student_hidden, self._student_layers, self.vocab_size,
            self._block("student_probs", len(self._student_layers), chunk, device),
            self._block("student_log_probs", self._log_prob_rows(self._student_layers), chunk, device),
            work,
        )  # fmt: skip
        targets = targets.to(device)  # [c]
        self._add_model_sums(self.student, student, targets, work)
        if teacher_hidden is None:
            teacher = student
        else:
            teacher = read_layers(
                self.teacher_lens, teacher_hidden, self._teacher_layers, self.vocab_size,
                self._block("teacher_probs", len(self._teacher_layers), chunk, device),
                self._block("teacher_log_probs", self._log_prob_rows(self._teacher_layers), chunk, device),
                work,
            )  # fmt: skip
            self._add_model_sums(self.teacher, teacher, targets, work)
        student_rows, teacher_rows = self._pair_rows
        sums = pair_divergence_sums(
            self.divergences,
            student,
            teacher,
            student_rows,
            teacher_rows,
            self.jsd_beta,
            work,
            self._mixture_sums,
        )
        for name, total in sums.items():
            self.pair_sums[name] += total

    def _add_model_sums(
        self, sums: ModelLayerSums, layers: ChunkLayers, targets: torch.Tensor, work: torch.Tensor
    ) -> None:
        if self.layer_statistics:
            _add_layer_sums(sums, layers, targets, self.divergences, self.jsd_beta, work, self._mixture_sums)
        else:
            _add_final_ce(sums, layers.log_probs[-1], targets)

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
    sums: ModelLayerSums,
    layers: ChunkLayers,
    targets: torch.Tensor,
    divergences: Sequence[str],
    jsd_beta: float,
    work: torch.Tensor,
    mixture_sums: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
) -> None:
    """Add one chunk's entropy, top-1 agreement, divergence-to-final and final-layer CE sums; ``layers`` holds
    every layer ``0..L`` of one model, ``targets`` is ``[c]``."""
    sums.entropy -= layers.negentropy.double().sum(dim=-1)
    sums.top1_agreement += (layers.top1 == layers.top1[-1:]).sum(dim=-1).double()  # [L + 1]
    rows = list(range(layers.num_rows))
    final = layers.final()  # the final layer alone: the cross terms are L + 1 dot products
    to_final = pair_divergence_sums(
        divergences, layers, final, rows, [0] * len(rows), jsd_beta, work, mixture_sums
    )
    for name, total in sums.divergence_to_final.items():
        total += to_final[name]
    _add_final_ce(sums, layers.log_probs[-1], targets)


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

    Stops once ``max_tokens`` tokens were added; ``progress`` (a tqdm bar) is advanced by the tokens of each
    chunk, as soon as it is added (a batch of a large pair takes minutes, a chunk seconds).
    """
    for batch in batches:
        remaining = None if max_tokens is None else max_tokens - int(accumulator.num_tokens)
        if remaining is not None and remaining <= 0:
            break
        student_hidden = hidden_states_of(student, batch)
        teacher_hidden = hidden_states_of(teacher, batch) if teacher is not None else None
        accumulator.add(
            student_hidden,
            teacher_hidden,
            batch["labels"],
            max_tokens=remaining,
            on_chunk=progress.update if progress is not None else None,
        )
    return accumulator


# --------------------------------------------------------------------------------------------- during training
@torch.no_grad()
def evaluation_lens_profile(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    student_lens: LogitLens,
    teacher_lens: LogitLens,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    vocab_size: int,
    divergence: str,
    jsd_beta: float,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda flat: flat,
    prefix: str = "eval",
) -> dict[str, float]:
    """The per-layer metrics of a training's evaluation (``lens_eval_profile``) on ``batches`` (collated, on the
    models' device): ``student`` and ``teacher`` (as they are called; the student in eval mode meanwhile) are run
    on every batch and read through their lenses.

    ``{prefix}_lens_profile/s{i}``: the student's layer ``i`` against the teacher layer at the same relative depth,
    in ``divergence`` (the training's ``lens_divergence``); ``{prefix}_lens_entropy/s{i}`` / ``/t{j}``: entropy in
    nats of each layer's lens distribution; per response token, the sums first passed through ``reduce_sum`` (a sum
    across processes). One extra forward pass of both models over the batches.
    """
    accumulator = LensProfileAccumulator(
        student_lens,
        teacher_lens,
        vocab_size,
        pairs=same_depth_pairs(student_lens.num_layers, teacher_lens.num_layers),
        divergences=[divergence],
        jsd_beta=jsd_beta,
    )
    was_training = student.training
    student.eval()
    try:
        accumulate_batches(accumulator, student, teacher, batches)
    finally:
        student.train(was_training)
    accumulator.reduce_(reduce_sum)
    means = accumulator.means()
    metrics = {
        f"{prefix}_lens_profile/s{s}": value
        for (s, _), value in zip(accumulator.pairs, means["pairs"][divergence])
    }
    for side, letter in (("student", "s"), ("teacher", "t")):
        for layer, value in enumerate(means[side]["entropy"]):
            metrics[f"{prefix}_lens_entropy/{letter}{layer}"] = value
    return metrics
