"""One chunk of a model's layers on reused blocks: what the lens profile (:mod:`.profile`) computes per chunk.

Each layer's head product is written into its row of a ``[n, c, V]`` fp32 probability block and turned into
probabilities there (:func:`read_layers`), with per-token sums over the vocabulary (``Σ p·λ``, ``Σ p``, the top-1
entry) on tiles that stay in the CPU's cache; log-probabilities are kept for every layer only where a per-pair
formula reads them. :func:`pair_divergence_sums` then sums each divergence of many layer pairs over the chunk's
tokens by the registry's per-pair formulas. :func:`chunk_size_for_budget` sizes a chunk from a memory budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..loss.divergences import LOG_PROB_FLOOR, LayerPairs, divergence_record
from ..loss.fused_math import shift_by_row_max_
from ..loss.lens import LogitLens

# The default memory for a chunk's blocks (probabilities of every layer read, the log-probabilities kept, two work
# blocks): the chunk size follows from it (:func:`chunk_size_for_budget`), between 1 and MAX_CHUNK_SIZE tokens.
DEFAULT_MEMORY_BUDGET_MIB = 1024
MAX_CHUNK_SIZE = 256
WORK_BLOCKS = 2  # [chunk, V] fp32 work blocks besides the per-layer ones
# A tile of the per-layer softmax (its log-probabilities, probabilities and a work row): small enough for the three
# to stay in a CPU core's L2 cache (1-2 MiB) across the softmax's passes.
TILE_BYTES = 512 * 2**10
# On the CPU, torch.exp of an fp32 argument below about -87 (a result below the smallest normal float) takes 40 ns
# instead of 0.2; on real text the lens rows of layer 0 (the embedding output) have 73% of such entries, a middle
# layer's up to 0.7%. The profile floors exp's argument here: e^-72 (5e-32, divided by a sum of at most V) stays a
# normal float for any vocabulary up to 4e6, and no fp32 sum over a vocabulary can tell it from zero.
EXP_ARGUMENT_FLOOR = -72.0


def chunk_size_for_budget(
    block_rows: int, vocab_size: int, budget_mib: float = DEFAULT_MEMORY_BUDGET_MIB
) -> int:
    """Tokens per chunk whose fp32 blocks (``block_rows`` rows of ``V`` per token, the work blocks' included) fit
    in ``budget_mib``; at least 1, at most :data:`MAX_CHUNK_SIZE`. E.g. 6 + 30 blocks (38 layers read) at
    V = 49152: the JSD's 38 + 2 + 2 rows (probabilities, two final log-probability rows, the work rows) give 130
    tokens in 1 GiB; a KL's 2·38 + 2 rows give 70."""
    bytes_per_token = 4 * vocab_size * block_rows
    return max(1, min(MAX_CHUNK_SIZE, int(budget_mib * 2**20) // bytes_per_token))


@dataclass
class ChunkLayers:
    """One model's layers on one chunk of ``c`` tokens, in reused blocks: fp32 floored log-probabilities λ and
    probabilities p (``[n, c, V]``, one row per layer read; λ only the last layer's, ``[1, c, V]``, where no
    per-pair formula reads it), their per-token ``Σ p·λ`` (``negentropy``) and ``Σ p`` (``mass``), ``[n, c]`` each
    (the :class:`~distillens_trainer.loss.divergences.LayerStatistics` the divergences' per-pair formulas read),
    and each token's top-1 entry (``top1``, ``[n, c]``)."""

    log_probs: torch.Tensor
    probs: torch.Tensor
    negentropy: torch.Tensor
    mass: torch.Tensor
    top1: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.probs.shape[0]

    def final(self) -> ChunkLayers:
        """A view of the last layer alone (no copy)."""
        last = slice(-1, None)
        return ChunkLayers(
            self.log_probs[last], self.probs[last], self.negentropy[last], self.mass[last], self.top1[last]
        )


def read_layers(
    lens: LogitLens,
    hidden_states: Sequence[torch.Tensor],
    layers: Sequence[int],
    vocab_size: int,
    probs_block: torch.Tensor,
    log_probs_block: torch.Tensor,
    work: torch.Tensor,
) -> ChunkLayers:
    """Read ``layers`` (``hidden_states`` indices, ``[c, d]`` each) through ``lens`` into the reused blocks, in
    place: probabilities into ``probs_block`` (``[n, c, V]``), floored log-probabilities (dead rows made uniform,
    as :func:`~distillens_trainer.loss.divergences.log_probs` does) into ``log_probs_block``, which holds every
    layer (``[n, c, V]``) or the last one alone (``[1, c, V]``); ``work`` is a ``[2, c, V]`` block.

    The head products come first, back to back (the head's weight stays in the CPU's cache between them), each
    straight into its row of ``probs_block``; :func:`softmax_statistics_` then turns each row into probabilities in
    place."""
    head = lens.linear_head()
    writes_in_place = head is not None and head.weight.dtype == probs_block.dtype
    for row, index in enumerate(layers):
        if writes_in_place:  # the head product straight into the block: no [c, V] copy
            head.logits_into(lens.to_head_input(hidden_states[index], index), probs_block[row])
        else:
            probs_block[row].copy_(lens(hidden_states[index], index)[..., :vocab_size])
    negentropy, mass, top1 = softmax_statistics_(probs_block, log_probs_block, work)
    return ChunkLayers(log_probs_block, probs_block, negentropy, mass, top1)


def softmax_statistics_(
    logits: torch.Tensor, log_probs: torch.Tensor, work: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place: ``[n, c, V]`` fp32 logits -> their probabilities; their floored log-probabilities (dead rows
    uniform) into ``log_probs``, which keeps every row (``[n, c, V]``) or the last one alone (``[1, c, V]``); returns
    the ``Σ p·λ``, ``Σ p`` and top-1 entry of each row and token, ``[n, c]`` each. ``work``: ``[2, c', V]``.

    On tiles of a few tokens (:func:`tile_tokens`) whose rows stay in the CPU's cache across the passes; every
    value is that of the whole row at once (the passes are per token)."""
    num_rows, num_tokens, vocab_size = logits.shape
    negentropy = logits.new_empty(num_rows, num_tokens)
    mass = logits.new_empty(num_rows, num_tokens)
    top1 = torch.empty(num_rows, num_tokens, dtype=torch.long, device=logits.device)
    first_kept = num_rows - log_probs.shape[0]  # the rows before it leave their log-probabilities in work
    tile = tile_tokens(vocab_size)
    for row in range(num_rows):
        top1[row] = first_max_index(logits[row])  # [c]: the largest logit is the largest log-probability
        for start in range(0, num_tokens, tile):
            tokens = slice(start, min(start + tile, num_tokens))
            p = logits[row, tokens]  # [t, V]: logits in, probabilities out
            log_p = log_probs[row - first_kept, tokens] if row >= first_kept else work[0, : p.shape[0]]
            _lens_softmax_(log_p.copy_(p), p)
            torch.sum(torch.mul(p, log_p, out=work[1, : p.shape[0]]), dim=-1, out=negentropy[row, tokens])
            torch.sum(p, dim=-1, out=mass[row, tokens])
    return negentropy, mass, top1


def _lens_softmax_(logits: torch.Tensor, probs: torch.Tensor) -> None:
    """In place: ``[t, V]`` fp32 logits -> floored log-probabilities (dead rows uniform); ``probs`` <- the
    probabilities, as exp(shifted logits, floored at :data:`EXP_ARGUMENT_FLOOR`) / their sum: one exponential, none
    of its slow arguments (within an ulp of the training path's exp of the floored log-probabilities, and at most
    e^-72 where that is smaller)."""
    shift_by_row_max_(logits)
    torch.clamp(logits, min=EXP_ARGUMENT_FLOOR, out=probs).exp_()
    total = probs.sum(dim=-1, keepdim=True)  # >= 1
    probs.div_(total)
    logits.sub_(total.log_()).clamp_min_(LOG_PROB_FLOOR)


def first_max_index(values: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``[t, V]`` -> ``[t]``: the first index of each row's largest value, as ``values.argmax(dim=-1)`` gives it for
    rows without NaN, from vectorised max-reductions (the CPU's ``argmax`` is ten times slower than ``amax``): the
    largest value, then the first ``block`` of entries holding it, then the first entry of that block."""
    num_rows, vocab_size = values.shape
    num_blocks = vocab_size // block
    if num_blocks == 0:
        return values.argmax(dim=-1)
    row_max = values.amax(dim=-1, keepdim=True)  # [t, 1]
    blocked = values[:, : num_blocks * block].reshape(num_rows, num_blocks, block)  # [t, nb, B]
    in_blocks = blocked.amax(dim=-1) == row_max  # [t, nb]: blocks holding the largest value
    first_block = in_blocks.byte().argmax(dim=-1)  # [t], 0 where none does
    rows = torch.arange(num_rows, device=values.device)
    index = first_block * block + blocked[rows, first_block].argmax(dim=-1)
    if num_blocks * block < vocab_size:  # the tail after the last whole block: where no block holds the max
        tail = values[:, num_blocks * block :].argmax(dim=-1) + num_blocks * block
        index = torch.where(in_blocks.any(dim=-1), index, tail)
    return index


def tile_tokens(vocab_size: int) -> int:
    """Tokens per tile of the per-layer softmax: as many ``V``-wide fp32 rows as :data:`TILE_BYTES` hold, at least
    one (2 at V = 49152)."""
    return max(1, TILE_BYTES // (4 * vocab_size))


def pair_divergence_sums(
    divergences: Sequence[str],
    student: ChunkLayers,
    teacher: ChunkLayers,
    student_rows: Sequence[int],
    teacher_rows: Sequence[int],
    jsd_beta: float,
    work: torch.Tensor,
    mixture_sums: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``{name: [P] fp64}``: the sum over the chunk's tokens of D(student row ‖ teacher row) for each pair
    ``(student_rows[k], teacher_rows[k])``, student first as in training.

    Each divergence's ``per_pair`` formula (:data:`~distillens_trainer.loss.divergences.DIVERGENCES`) gives it per
    token in fp32, from the chunk's per-layer sums and per-pair row dots (the cross terms shared by the KL kinds
    computed once); ``work`` is a ``[2, c, V]`` block it may overwrite; ``mixture_sums`` replaces the JSD's eager
    pass (:class:`~distillens_trainer.loss.divergences.LayerPairs`). The sums are accumulated in fp64.
    """
    pairs = LayerPairs(student, teacher, student_rows, teacher_rows, work, mixture_sums)
    sums: dict[str, torch.Tensor] = {}
    for name in divergences:
        per_token = divergence_record(name, "divergences").per_pair(pairs, beta=jsd_beta)  # [c, P]
        sums[name] = per_token.double().sum(dim=0)  # [c, P] -> [P]
    return sums
