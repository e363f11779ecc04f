"""Whole checkpoints: telling a complete ``checkpoint-N`` folder from one whose save was cut short, and choosing
the checkpoint to resume from.

``Trainer._save_checkpoint`` (transformers 5) writes straight into ``checkpoint-N`` (no staging folder): the
model, then ``optimizer.pt``/``scheduler.pt``/``rng_state.pth``, and ``trainer_state.json`` last. So
``trainer_state.json`` is the completion marker: :class:`~distillens_trainer.DistillLensTrainer` removes a stale
one before saving into an existing folder, and a folder without it (or with invalid JSON in it, or with a weights or
torch file shorter than its own header says) is incomplete. ``--resume_from_checkpoint true`` skips incomplete
folders with one logged line each; an explicitly named incomplete folder is refused with one line naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zipfile
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"  # written last by Trainer._save_checkpoint
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file at ``path`` is not whole (its header promises more bytes than it holds), or None."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            if 8 + header_size > size:
                return f"is cut short ({size} bytes, shorter than its header)"
            header = json.loads(handle.read(header_size))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
        return f"is cut short or not a safetensors file ({size} bytes)"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_size + max(ends, default=0)
    if size < expected:
        return f"is cut short ({size} of {expected} bytes)"
    return None


def torch_file_problem(path: Path) -> str | None:
    """Why the ``torch.save`` archive at ``path`` is not whole (a zip whose central directory, written last, is
    missing or points past the end), or None."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            end = max((info.header_offset + info.compress_size for info in archive.infolist()), default=0)
    except (zipfile.BadZipFile, OSError, ValueError):
        return f"is cut short or not a torch archive ({size} bytes)"
    if end > size:
        return f"is cut short ({size} bytes, its index needs {end})"
    return None


def checkpoint_problem(folder: str | os.PathLike[str]) -> str | None:
    """What makes ``folder`` an incomplete checkpoint, naming the file (``"optimizer.pt is cut short (...)"``), or
    None when it is whole. Reads only headers and zip indexes, not the tensors."""
    folder = Path(folder)
    state = folder / TRAINER_STATE_NAME
    if not state.is_file():
        return f"{TRAINER_STATE_NAME} is missing (the save did not finish)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{TRAINER_STATE_NAME} is not valid JSON (the save did not finish)"
    for file in sorted(folder.iterdir()):
        if not file.is_file():
            continue
        if file.suffix == ".safetensors":
            problem = safetensors_problem(file)
        elif file.suffix in _TORCH_SUFFIXES:
            problem = torch_file_problem(file)
        else:
            continue
        if problem:
            return f"{file.name} {problem}"
    return None


def checkpoint_folders(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The ``checkpoint-N`` folders in ``output_dir``, newest (highest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _CHECKPOINT_NAME.match(path.name)) and path.is_dir()
    ]
    return [path for _, path in sorted(found, reverse=True)]


def newest_complete_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest whole checkpoint in ``output_dir``; each newer incomplete one is skipped with a logged line."""
    for folder in checkpoint_folders(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("skipping the incomplete checkpoint %s: %s.", folder, problem)
    return None


def wants_latest_checkpoint(value: str | bool | None) -> bool:
    """True for the Trainer's "resume from the latest checkpoint" (``True``, or ``"true"`` from a command line)."""
    if isinstance(value, bool):
        return value
    return isinstance(value, str) and value.strip().lower() == "true" and not Path(value).exists()


def resume_requested(value: str | bool | None) -> bool:
    """Whether ``resume_from_checkpoint`` asks to resume at all (``None``, ``False``, ``""``, ``"false"`` do not)."""
    if isinstance(value, str):
        text = value.strip()
        return bool(text) and (text.lower() not in ("false", "none") or Path(text).is_dir())
    return bool(value)


def resolve_resume_from_checkpoint(
    value: str | bool | None, output_dir: str | os.PathLike[str]
) -> str | None:
    """The checkpoint folder to resume from, or None for a fresh start.

    ``True``/``"true"``: the newest whole checkpoint in ``output_dir``. A path: that folder, refused (ValueError,
    one line naming the damaged file) when it is not a whole checkpoint.
    """
    if not resume_requested(value):
        return None
    if wants_latest_checkpoint(value):
        found = newest_complete_checkpoint(output_dir)
        if found is None:
            raise ValueError(
                f"resume_from_checkpoint=true found no complete checkpoint-N folder in output_dir="
                f"{str(output_dir)!r}: give a checkpoint folder, or start afresh without --resume_from_checkpoint."
            )
        return str(found)
    folder = Path(str(value))
    if not folder.is_dir():
        raise ValueError(
            f"resume_from_checkpoint={str(value)!r} is not a folder: give a checkpoint-N folder of an earlier run, "
            "or true for the newest complete one in output_dir."
        )
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise ValueError(
            f"resume_from_checkpoint={str(value)!r} is incomplete: {problem}: resume from an earlier checkpoint, "
            "or pass --resume_from_checkpoint true for the newest complete one in output_dir."
        )
    return str(folder)


def forget_completion(folder: str | os.PathLike[str]) -> None:
    """Before saving into an existing ``folder``: remove its ``trainer_state.json`` so that, until the new save
    writes it last, the folder reads as incomplete (and not as the older checkpoint with newer files mixed in)."""
    (Path(folder) / TRAINER_STATE_NAME).unlink(missing_ok=True)
