"""``DistillLensTrainer`` (:mod:`.distillens_trainer`) and what it adapts from a ``Trainer`` script (:mod:`.inputs`)."""

from .distillens_trainer import DistillLensTrainer

__all__ = ["DistillLensTrainer"]
