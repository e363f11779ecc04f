"""The lens profile of a student (against a teacher, or alone) on a tokenised dataset, as a JSON-ready dict.

``profile_models`` is the Python entry point behind ``distillens lens`` (and the quickstart notebook); its
result is what ``lens.json`` holds. Schema (``SCHEMA``), every layer index in the ``hidden_states``
convention (0 = embedding output, ``num_layers`` = the model's own output distribution)::

    schema, reference ("teacher" or "self"), divergences, jsd_beta, lens_final_norm, vocab_size,
    num_examples, num_tokens,
    student / teacher (null when reference is "self"):
        name, num_layers, layers [0..L], relative_depth [l / L],
        entropy [nats, per layer], top1_agreement [fraction of tokens whose top-1 token equals the final one],
        divergence_to_final {divergence: [per layer, D(layer || own final)]}
    matrix {divergence: [[D(student layer s || compared layer t) for t in 0..L_T] for s in 0..L_S]}
        (compared layers: the teacher's, or the student's own when reference is "self"),
    same_depth {pairs [[s, floor(s·L_T/L_S)] for s in 1..L_S], divergence: [...]} (null for "self"),
    mapped {pairs [[s, t], ...] (the training's layer map), divergence: [...]} (null when there is none).

Divergences take the student layer first, the teacher layer second (the training convention).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..data.collation import DataCollatorForCompletionOnly
from ..loss.divergences import PAPER_LENS_DIVERGENCE
from ..loss.layer_map import LayerPair
from ..loss.lens import LogitLens
from ..progress import progress
from .layer_blocks import DEFAULT_MEMORY_BUDGET_MIB
from .profile import (
    LensProfileAccumulator,
    accumulate_batches,
    compile_pays_off,
    same_depth_pairs,
)

logger = logging.getLogger(__name__)

SCHEMA = "distillens-lens-profile/1"
# The progress bar's note until the first chunk is done, when the JSD pass is compiled.
COMPILING_NOTE = "compiling the JSD pass first (once, about 10 s on a CPU)"


class _ClearsNoteOnFirstUpdate:
    """A progress bar whose postfix note is cleared by its first ``update``."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.noted = True

    def update(self, count: int) -> None:
        if self.noted:
            self.bar.set_postfix_str("")
            self.noted = False
        self.bar.update(count)


def finite_or_null(value: Any) -> tuple[Any, int]:
    """``value`` (nested dicts, lists, numbers) with every NaN or infinite float replaced by None (JSON ``null``:
    ``NaN`` is not JSON), and how many were replaced."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, 1
    if isinstance(value, dict):
        items = {key: finite_or_null(item) for key, item in value.items()}
        return {key: item for key, (item, _) in items.items()}, sum(count for _, count in items.values())
    if isinstance(value, (list, tuple)):
        items = [finite_or_null(item) for item in value]
        return [item for item, _ in items], sum(count for _, count in items)
    return value, 0


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def count_response_tokens(dataset: Any) -> int:
    """Response tokens (labels ≠ -100 after the causal shift) in a tokenised dataset."""
    return sum(sum(label != -100 for label in labels[1:]) for labels in dataset["labels"])


def _batches(dataset: Any, collator: Any, batch_size: int, device: torch.device):
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[index] for index in range(start, min(start + batch_size, len(dataset)))]
        yield {key: value.to(device) for key, value in collator(rows).items()}


def _model_entry(name: str, num_layers: int, means: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "num_layers": num_layers,
        "layers": list(range(num_layers + 1)),
        "relative_depth": [layer / num_layers for layer in range(num_layers + 1)],
        **means,
    }


def _pair_entry(pairs: Sequence[LayerPair], matrix: dict[str, list[list[float]]]) -> dict[str, Any]:
    entry: dict[str, Any] = {"pairs": [list(pair) for pair in pairs]}
    for name, rows in matrix.items():
        entry[name] = [rows[s][t] for s, t in pairs]
    return entry


@torch.no_grad()
def profile_models(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    dataset: Any,
    tokenizer: Any,
    *,
    vocab_size: int,
    mapped_pairs: Sequence[LayerPair] = (),
    divergences: Sequence[str] = (PAPER_LENS_DIVERGENCE,),
    jsd_beta: float = 0.5,
    lens_final_norm: bool = True,
    batch_size: int = 8,
    max_tokens: int | None = None,
    chunk_size: int | None = None,
    memory_budget_mib: float = DEFAULT_MEMORY_BUDGET_MIB,
    student_name: str = "student",
    teacher_name: str = "teacher",
    show_progress: bool = True,
    compile: bool | None = None,
) -> dict[str, Any]:
    """The lens profile (see the module docstring) on the response tokens of ``dataset``.

    Args:
        student / teacher: causal LMs; ``teacher=None`` profiles the student alone (compared with itself).
            Both run in eval mode (their previous mode is restored); the teacher's log-probabilities are
            moved to the student's device.
        dataset: tokenised rows with ``input_ids``, ``attention_mask`` and ``labels`` (as ``distillens train``
            builds them); the first ``max_tokens`` response tokens, in order, are used.
        vocab_size: the shared real vocabulary (see :func:`distillens_trainer.teacher.frozen.shared_vocab_size`).
        mapped_pairs: the training's layer map, reported under ``mapped``.
        chunk_size: tokens per chunk; None takes as many as ``memory_budget_mib`` MiB of reused blocks hold.
        show_progress: progress advanced by the tokens of each chunk (:func:`~distillens_trainer.progress.progress`:
            a bar on a terminal, else a line at least every 30 s with the time left).
        compile: ``torch.compile`` the JSD pass (:class:`LensProfileAccumulator`); None (default) compiles where
            that pays off (:func:`~distillens_trainer.diagnostics.profile.compile_pays_off`).
    """
    if len(dataset) == 0:
        raise ValueError("the dataset has no examples: give a data file with at least one example.")
    student_lens = LogitLens(student, final_norm=lens_final_norm)
    teacher_lens = LogitLens(teacher, final_norm=lens_final_norm) if teacher is not None else None
    available = count_response_tokens(dataset)
    target = available if max_tokens is None else min(available, max_tokens)
    if compile is None:
        compared = teacher_lens if teacher_lens is not None else student_lens
        num_pairs = (student_lens.num_layers + 1) * (compared.num_layers + 1)
        compile = compile_pays_off(target, num_pairs, vocab_size)
    accumulator = LensProfileAccumulator(
        student_lens,
        teacher_lens,
        vocab_size,
        divergences=divergences,
        jsd_beta=jsd_beta,
        chunk_size=chunk_size,
        memory_budget_mib=memory_budget_mib,
        compile=compile,
    )
    models = [model for model in (student, teacher) if model is not None]
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        bar = progress(target, "lens profile", unit="tokens", enabled=show_progress)
        if compile:  # the first chunk waits for the compilation: the bar says why it stands still
            bar.set_postfix_str(COMPILING_NOTE)
        try:
            accumulate_batches(
                accumulator,
                student,
                teacher,
                _batches(dataset, DataCollatorForCompletionOnly(tokenizer), batch_size, _device_of(student)),
                max_tokens=target,
                progress=_ClearsNoteOnFirstUpdate(bar) if compile else bar,
            )
        finally:
            bar.close()
    finally:
        for model, training in zip(models, was_training):
            model.train(training)
    if int(accumulator.num_tokens) == 0:
        raise ValueError("the data has no response tokens to profile: check --output_column / the templates.")
    return build_report(
        accumulator,
        mapped_pairs=mapped_pairs,
        num_examples=len(dataset),
        lens_final_norm=lens_final_norm,
        student_name=student_name,
        teacher_name=teacher_name,
    )


def build_report(
    accumulator: LensProfileAccumulator,
    *,
    mapped_pairs: Sequence[LayerPair] = (),
    num_examples: int | None = None,
    lens_final_norm: bool = True,
    student_name: str = "student",
    teacher_name: str = "teacher",
) -> dict[str, Any]:
    """The JSON-ready report of a full-matrix accumulator (``pairs`` = every pair, row-major)."""
    means = accumulator.means()
    student_layers = accumulator.student_lens.num_layers
    reference_layers = accumulator.reference_lens.num_layers
    width = reference_layers + 1
    matrix = {
        name: [values[row * width : (row + 1) * width] for row in range(student_layers + 1)]
        for name, values in means["pairs"].items()
    }
    has_teacher = accumulator.teacher_lens is not None
    return {
        "schema": SCHEMA,
        "reference": "teacher" if has_teacher else "self",
        "divergences": list(accumulator.divergences),
        "jsd_beta": accumulator.jsd_beta,
        "lens_final_norm": lens_final_norm,
        "vocab_size": accumulator.vocab_size,
        "num_examples": num_examples,
        "num_tokens": means["num_tokens"],
        "student": _model_entry(student_name, student_layers, means["student"]),
        "teacher": _model_entry(teacher_name, reference_layers, means["teacher"]) if has_teacher else None,
        "matrix": matrix,
        "same_depth": _pair_entry(same_depth_pairs(student_layers, reference_layers), matrix)
        if has_teacher
        else None,
        "mapped": _pair_entry(mapped_pairs, matrix) if has_teacher and mapped_pairs else None,
    }
