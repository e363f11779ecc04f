"""Writing results safely: atomic file writes and refusing to reuse a non-empty output directory (and the
``overwrite_output_dir`` field every command declares through :func:`overwrite_output_dir_field`)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import field
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` through a temporary file in the same folder and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> Path:
    """``payload`` as indented UTF-8 JSON, written atomically (non-JSON values through ``str``)."""
    return write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")


def check_output_dir(output_dir: str | os.PathLike[str], *, allowed: bool, how_to_allow: str) -> None:
    """ValueError when ``output_dir`` is a file, or a non-empty folder and reusing it is not ``allowed``."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir={str(output_dir)!r} is a file: give a directory path.")
    if path.is_dir() and any(path.iterdir()) and not allowed:
        raise ValueError(
            f"output_dir={str(output_dir)!r} is not empty: {how_to_allow}, or choose another directory."
        )


def overwrite_output_dir_field(what_happens: str) -> Any:
    """The ``overwrite_output_dir`` dataclass field of a command; ``what_happens`` to the folder's files if set."""
    return field(
        default=False, metadata={"help": f"Allow writing into a non-empty output_dir ({what_happens})."}
    )
