"""The one reader of JSON Lines files: every line a JSON object, every problem one line naming file and line.

``distillens eval`` reads its files through :func:`read_json_lines`; ``distillens train`` lets ``datasets`` read
them (cached, fast) and, when that fails or a row cannot be trained on, asks :func:`json_file_problem` and
:func:`line_of_row` where, so that both commands name the same ``file:line`` for the same bad line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FIX = "write one JSON object per line"


def _lines(path: Path, label: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines of `path`; ValueError (one line) when it is not UTF-8 text."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{label}{path}:{number}: not UTF-8 text; {FIX}.") from None
            if line.strip():
                yield number, line


def read_json_lines(path: str | os.PathLike[str], label: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON Lines file, in order.

    A line that is not valid JSON, or is JSON but not an object, is a ValueError
    ``"<label><path>:<line>: invalid JSON (<reason>); write one JSON object per line."``.
    """
    path = Path(path)
    for number, line in _lines(path, label):
        where = f"{label}{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: invalid JSON ({error.msg}); {FIX}.") from None
        if not isinstance(value, dict):
            raise ValueError(f"{where}: a JSON {json_kind(value)}, not an object; {FIX}.")
        yield number, value


def json_kind(value: Any) -> str:
    """The JSON name of a decoded value's type: ``array``, ``string``, ``number``, ..."""
    if value is None:
        return "null"
    kinds = ((bool, "boolean"), (list, "array"), (str, "string"), ((int, float), "number"), (dict, "object"))
    return next(name for kind, name in kinds if isinstance(value, kind))


def _is_json_array_file(path: Path) -> bool:
    """Whether `path` holds one JSON array (a ``.json`` file ``[{...}, ...]``) rather than JSON Lines."""
    with path.open("rb") as handle:
        return handle.read(4096).lstrip()[:1] == b"["


def json_file_problem(path: str | os.PathLike[str], label: str = "") -> str | None:
    """The first reason `path` is not readable as JSON Lines (or as one JSON array of objects), naming
    ``file:line``: a line that is not a JSON object, or a field whose JSON type changes from one line to a later
    one (nulls aside); None when there is neither."""
    path = Path(path)
    try:
        if _is_json_array_file(path):
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                return f"{label}{path}:{error.lineno}: invalid JSON ({error.msg}); {FIX}."
            bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
            if bad is None:
                return None
            return (
                f"{label}{path}: item {bad + 1} of its array is a JSON {json_kind(rows[bad])}, not an object."
            )
        first_seen: dict[str, tuple[str, int]] = {}
        for number, row in read_json_lines(path, label):
            for key, value in row.items():
                kind = json_kind(value)
                seen = first_seen.setdefault(key, (kind, number)) if value is not None else (kind, number)
                if seen[0] != kind:
                    return (
                        f"{label}{path}:{number}: `{key}` is a JSON {kind} here but a JSON {seen[0]} on line "
                        f"{seen[1]}: give each field one type in every row."
                    )
    except UnicodeDecodeError:
        return f"{label}{path}: not UTF-8 text; {FIX}."
    except ValueError as error:
        return str(error)
    return None


def line_of_row(path: str | os.PathLike[str], index: int) -> int | None:
    """The line number of row `index` (0-based) of a JSON Lines file, as ``datasets`` numbers rows (blank lines
    skipped); None for a JSON array file or when the file has fewer rows."""
    path = Path(path)
    if _is_json_array_file(path):
        return None
    for row, (number, _) in enumerate(_lines(path, "")):
        if row == index:
            return number
    return None
