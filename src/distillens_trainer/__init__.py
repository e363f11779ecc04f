"""DistillLens for Hugging Face: symmetric knowledge distillation through the logit lens."""

from .config import DistillLensConfig
from .distributed.quiet import hide_deepspeed_cpu_notice
from .loss.divergences import token_divergence
from .loss.layer_map import resolve_layer_map
from .loss.lens import LogitLens
from .loss.objective import DistillLensObjective, distillens_loss
from .loss.spec import ObjectiveSpec
from .trainer.distillens_trainer import DistillLensTrainer
from .version import __version__

# DeepSpeed's "Setting accelerator to CPU" warning, printed whenever it is installed (Trainer and save_pretrained import
# it through accelerate) even when no run uses it; DistillLensTrainer shows it again for a run with deepspeed set.
hide_deepspeed_cpu_notice()

__all__ = [
    "DistillLensConfig",
    "DistillLensObjective",
    "DistillLensTrainer",
    "LogitLens",
    "ObjectiveSpec",
    "__version__",
    "distillens_loss",
    "resolve_layer_map",
    "token_divergence",
]
