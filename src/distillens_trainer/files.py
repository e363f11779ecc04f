"""Writing results safely: atomic file writes and refusing to reuse a non-empty output directory (and the
``overwrite_output_dir`` field every command declares through :func:`overwrite_output_dir_field`)."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import field
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process's file-mode creation mask (read from ``/proc`` where it can be, so it is never changed)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def user_mode(mode: int) -> int:
    """``mode`` (0o666 for a file, 0o777 for a folder) as the user's umask would have created it."""
    return mode & ~current_umask()


def make_staging_dir(parent: str | os.PathLike[str], name: str) -> Path:
    """A new empty folder ``.NAME.*`` in ``parent``, to be renamed into place once filled, with the permissions the
    user's umask gives any new folder (``tempfile.mkdtemp`` alone makes it 0700, private)."""
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}."))
    staging.chmod(user_mode(0o777))
    return staging


def give_user_modes(folder: str | os.PathLike[str]) -> None:
    """Give ``folder`` and every file in it the mode the user's umask gives new ones (``mkdtemp`` makes folders 0700
    and safetensors writes 0600, private even when the umask shares)."""
    folder = Path(folder)
    folder.chmod(user_mode(0o777))
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(user_mode(0o777 if path.is_dir() else 0o666))


def folder_contents(folder: str | os.PathLike[str]) -> tuple[int, int]:
    """``(files, bytes)``: how many regular files ``folder`` holds, in all its sub-folders, and their total size."""
    sizes = [path.stat().st_size for path in Path(folder).rglob("*") if path.is_file()]
    return len(sizes), sum(sizes)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` through a temporary file in the same folder and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp_name, user_mode(0o666))  # mkstemp creates 0600; give it the mode of any new file
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike[str], payload: Any, *, allow_nan: bool = True) -> Path:
    """``payload`` as indented UTF-8 JSON, written atomically (non-JSON values through ``str``); with
    ``allow_nan=False`` a NaN or infinite float is a ValueError instead of a ``NaN`` that is not JSON."""
    text = json.dumps(payload, indent=2, ensure_ascii=False, default=str, allow_nan=allow_nan)
    return write_text_atomic(path, text + "\n")


def nearest_existing(path: str | os.PathLike[str]) -> Path:
    """``path`` itself or its closest ancestor that exists (what creating ``path`` would write into)."""
    missing = missing_folders(path)
    return missing[-1].parent if missing else Path(path).absolute()


def check_output_dir(output_dir: str | os.PathLike[str], *, allowed: bool, how_to_allow: str) -> None:
    """ValueError (one line naming the folder) unless ``output_dir`` is, or can be created as, a writable
    directory; and when it is a non-empty folder and reusing it is not ``allowed``.

    Reads only: nothing is created, so a refused command leaves the file system as it was.
    """
    if not str(output_dir).strip():
        raise ValueError(
            "output_dir is empty (--output_dir ''): give the folder to write into, e.g. --output_dir runs/my_run."
        )
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir={str(output_dir)!r} is a file: give a directory path.")
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise ValueError(
            f"output_dir={str(output_dir)!r} lies under the file {str(existing)!r}, which cannot hold folders: "
            "give a directory path."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"output_dir={str(output_dir)!r} cannot be written: {str(existing)!r} is read-only (its permissions or "
            "a read-only file system): choose a writable --output_dir."
        )
    if path.is_dir() and any(path.iterdir()) and not allowed:
        raise ValueError(
            f"output_dir={str(output_dir)!r} is not empty: {how_to_allow}, or choose another directory."
        )


def missing_folders(path: str | os.PathLike[str]) -> list[Path]:
    """The folders that creating ``path`` would create, deepest first (empty when ``path`` exists)."""
    current, missing = Path(path).absolute(), []
    while not current.exists() and current.parent != current:
        missing.append(current)
        current = current.parent
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """``rmdir`` each of ``folders`` (deepest first) that is still empty; a folder that holds anything stays."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or gone): its parents are not empty either


# errno values of a write that cannot succeed where it goes: full disk or quota, read-only file system, too big;
# and no permission (counted only when the error names a path in the output folder).
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM}
# How torch's zip writer and safetensors (which do not raise OSError) word the same failures.
_WRITE_FAILURE_WORDS = re.compile(
    r"No space left|StorageFull|Disk quota|QuotaExceeded|Read-only file system|ReadOnlyFilesystem|"
    r"PermissionDenied|PytorchStreamWriter failed|file write failed",
    re.IGNORECASE,
)


def _in_output_dir(filename: Any, folder: Path) -> bool:
    """``filename`` lies in ``folder`` or is a staging sibling of it (``.NAME.*``, as ``shrink`` writes)."""
    try:
        path, folder = Path(os.fsdecode(filename)).absolute(), folder.absolute()
    except (TypeError, ValueError):
        return False
    staging = path.parent == folder.parent and path.name.startswith(f".{folder.name}.")
    return path.is_relative_to(folder) or staging


def write_failure_line(error: BaseException, output_dir: str | os.PathLike[str], fix: str) -> str | None:
    """One line naming ``output_dir`` for ``error`` when it is a failed write there (full disk, read-only, ...),
    else None (the error is something else and keeps its traceback)."""
    if isinstance(error, OSError):
        named = error.filename is not None and _in_output_dir(error.filename, Path(output_dir))
        if not (named and error.errno in _SPACE_ERRNOS | _PERMISSION_ERRNOS) and not (
            error.filename is None and error.errno in _SPACE_ERRNOS
        ):
            return None
        reason = error.strerror or type(error).__name__
        where = f" ({os.fsdecode(error.filename)})" if error.filename is not None else ""
    elif isinstance(error, RuntimeError) or type(error).__name__ == "SafetensorError":
        match = _WRITE_FAILURE_WORDS.search(str(error))
        if match is None:
            return None
        reason, where = match.group(0), ""
    else:
        return None
    return f"could not write into output_dir={str(output_dir)!r}: {reason}{where}: {fix}."


@contextmanager
def writing_into(
    output_dir: str | os.PathLike[str],
    fix: str = "free space there (or make it writable), or choose another --output_dir",
) -> Iterator[None]:
    """Turn a failed write into ``output_dir`` (full disk, read-only file system, ...) raised inside the block into a
    ValueError of one line naming the folder and ``fix``; every other error passes unchanged."""
    try:
        yield
    except Exception as error:
        line = write_failure_line(error, output_dir, fix)
        if line is None:
            raise
        raise ValueError(line) from error


def overwrite_output_dir_field(what_happens: str) -> Any:
    """The ``overwrite_output_dir`` dataclass field of a command; ``what_happens`` to the folder's files if set."""
    return field(
        default=False, metadata={"help": f"Allow writing into a non-empty output_dir ({what_happens})."}
    )
