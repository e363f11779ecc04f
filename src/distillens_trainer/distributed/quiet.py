"""Keeping other libraries' notices about features not in use off the console: the one place that quiets DeepSpeed.

With DeepSpeed installed (the ``dev`` extra) but not used, ``transformers.Trainer`` still imports it: accelerate's
``extract_model_from_parallel`` (called by ``Trainer.__init__`` through ``accelerator.unwrap_model``) imports
``deepspeed`` whenever the package is installed, and DeepSpeed's import logs "Setting accelerator to CPU ..." on
a machine without a GPU; ``PreTrainedModel.save_pretrained`` does the same through ``unwrap_model``. The import is
accelerate's and cannot be avoided from here, so that one message of the ``DeepSpeed`` logger is dropped when a
run does not use DeepSpeed: from ``import distillens_trainer`` on, undone by the ``distillens`` entry point for a
command line that may use DeepSpeed (:func:`mentions_deepspeed`) and by ``DistillLensTrainer`` for a config that
sets it. Its other messages pass, and DeepSpeed still picks its accelerator itself (``DS_ACCELERATOR`` is the
user's to set).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

DEEPSPEED_LOGGER = "DeepSpeed"
DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"
# What `accelerate launch` exports for a run its config file gives a DeepSpeed plugin (no --deepspeed flag then).
ACCELERATE_DEEPSPEED_VARIABLE = "ACCELERATE_USE_DEEPSPEED"


class DropDeepSpeedCpuNotice(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU" warning and passes every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DEEPSPEED_CPU_NOTICE)


def launched_with_deepspeed() -> bool:
    """Whether ``accelerate launch`` started this process with a DeepSpeed config (no ``--deepspeed`` flag then)."""
    return os.environ.get(ACCELERATE_DEEPSPEED_VARIABLE, "false").lower() in ("1", "true", "yes")


def hide_deepspeed_cpu_notice(hide: bool = True) -> None:
    """Drop DeepSpeed's CPU-fallback warning from now on (``hide=False``: show it again, for a run that uses
    DeepSpeed); a process that ``accelerate launch`` started with DeepSpeed keeps it. DeepSpeed need not be
    imported yet: its logger keeps the filter when DeepSpeed configures it."""
    hide = hide and not launched_with_deepspeed()
    deepspeed_logger = logging.getLogger(DEEPSPEED_LOGGER)
    installed = [item for item in deepspeed_logger.filters if isinstance(item, DropDeepSpeedCpuNotice)]
    if hide and not installed:
        deepspeed_logger.addFilter(DropDeepSpeedCpuNotice())
    for item in installed if not hide else ():
        deepspeed_logger.removeFilter(item)


def mentions_deepspeed(argv: Sequence[str]) -> bool:
    """Whether a command line (or the config file it starts with) may ask for DeepSpeed: a ``--deepspeed`` flag,
    or a config file that names it."""
    if any(item.startswith("--deepspeed") for item in argv):
        return True
    first = Path(argv[0]) if argv and not argv[0].startswith("-") else None
    try:
        return first is not None and first.is_file() and "deepspeed" in first.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
