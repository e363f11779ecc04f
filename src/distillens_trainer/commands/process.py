"""How a ``distillens`` process starts and ends under a launcher (torchrun, ``deepspeed``, ``accelerate launch``):
the world size it was launched into, the refusal of a launch whose ranks would each train alone, and the exit
without interpreter shutdown. (DeepSpeed's notices are quieted in one place, :mod:`distillens_trainer.distributed.quiet`.)"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from typing import Any, NoReturn

import torch


# --------------------------------------------------------------------------------------------- launch
def launched_world_size() -> int:
    """How many processes a launcher (torchrun, ``deepspeed``, ``accelerate launch``) started: ``WORLD_SIZE``."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_launched_world_size(trainer_args: Any) -> None:
    """Refuse a launch whose processes would each train alone.

    On a machine without a GPU, ``TrainingArguments`` only joins the processes with ``use_cpu=True`` (DDP over
    gloo) and otherwise gives each a world of one, so N copies of the same run would write the same
    ``output_dir``.
    """
    launched = launched_world_size()
    if launched > 1 and trainer_args.world_size == 1:
        raise ValueError(
            f"launched as {launched} processes, but each would train alone (no GPU backend joined them) into the "
            "same output_dir: on a CPU-only machine pass --use_cpu true (DDP over gloo, without --deepspeed), "
            "or launch on GPUs."
        )


# --------------------------------------------------------------------------------------------- shutdown
def end_process_group(*, wait_for_peers: bool) -> None:
    """Destroy the default process group that a launcher (torchrun, ``deepspeed``, ``accelerate launch``) made.

    ``wait_for_peers`` first meets the other ranks at a barrier, so that no rank leaves while another is still
    in its last collective; pass False on an error path, where a peer may never arrive. Without a process group
    this does nothing. A launched script then leaves with :func:`exit_launched_process`.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if wait_for_peers:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def exit_launched_process(exit_code: int) -> NoReturn:
    """End a launched rank after :func:`end_process_group`, without interpreter shutdown.

    gloo runs each collective on a worker thread, which lets go of the collective's tensors, and so takes the
    GIL, only after the caller has moved on. A thread that takes the GIL once interpreter shutdown has begun is
    killed inside a ``noexcept`` destructor and the process aborts (``terminate called without an active
    exception``, SIGABRT) after a run that finished and saved everything; destroying the process group does not
    stop those threads while DeepSpeed still holds the group. So this runs the ``atexit`` handlers (loggers,
    trackers, temporary files) and flushes stdout and stderr while the interpreter is whole, then leaves with
    ``os._exit``.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):  # closed, replaced or None
            stream.flush()
    os._exit(exit_code)
