"""Evaluation files: JSONL rows with an instruction and one or more references."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.json_lines import read_json_lines


def references_of(example: dict[str, Any]) -> list[str]:
    """All references of an example: `outputs` when present, else `output` (a string or a list)."""
    refs = example.get("outputs", example.get("output"))
    return [refs] if isinstance(refs, str) else list(refs)


def check_example(example: Any, where: str) -> None:
    """Reject a row that lacks an instruction or a usable reference."""
    if not isinstance(example, dict):
        raise ValueError(f"{where}: expected a JSON object with `instruction` and `output` fields")
    if not isinstance(example.get("instruction"), str):
        raise ValueError(f"{where}: missing string field `instruction`; add it to every row")
    refs = example.get("outputs", example.get("output"))
    valid_list = isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)
    if not (isinstance(refs, str) or valid_list):
        raise ValueError(
            f"{where}: missing field `output` (a string) or `outputs` (a list of strings); add it"
        )


def load_eval_examples(path: str | os.PathLike[str], max_samples: int | None = None) -> list[dict[str, Any]]:
    """Read a JSONL eval file (blank lines skipped; through the reader ``train`` uses to name a bad line) and return
    its first `max_samples` rows."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"eval_files: no such file {str(path)!r}; pass an existing JSONL path")
    examples: list[dict[str, Any]] = []
    for line_number, example in read_json_lines(path, label="eval_files: "):
        check_example(example, f"eval_files: {path}:{line_number}")
        examples.append(example)
        if max_samples is not None and len(examples) >= max_samples:
            break
    if not examples:
        raise ValueError(f"eval_files: {str(path)!r} holds no examples; pass a non-empty JSONL file")
    return examples


def unique_file_names(paths: Sequence[str]) -> list[str]:
    """Short names for eval files: the stem, or `<parent>_<stem>` when stems collide (e.g. valid.jsonl)."""
    stems = [Path(p).stem for p in paths]
    names = [f"{Path(p).parent.name}_{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)]
    if len(set(names)) != len(names):
        raise ValueError(f"eval_files: {list(paths)} contains duplicate files; list each file once")
    return names
