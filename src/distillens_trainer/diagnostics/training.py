"""``lens_eval_profile``: every student layer's lens divergence from the teacher, logged at each evaluation.

The metrics are ``{prefix}_lens_profile/s{i}`` (the student's layer ``i`` against the teacher layer at the
same relative depth, in the training's ``lens_divergence``) and ``{prefix}_lens_entropy/s{i}`` /
``/t{j}`` (entropy in nats of each layer's lens distribution), per response token of the evaluation set,
summed across processes. They cost one extra forward pass of both models over the evaluation set.
"""

from __future__ import annotations

from typing import Any

import torch

from ..lens import LogitLens
from .profile import LensProfileAccumulator, accumulate_batches, same_depth_pairs


@torch.no_grad()
def evaluation_lens_profile(trainer: Any, dataloader: Any, prefix: str = "eval") -> dict[str, float]:
    """The per-layer metrics of a :class:`~distillens_trainer.DistillLensTrainer` on ``dataloader``."""
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
