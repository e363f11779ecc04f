"""Checking a teacher cache against what its manifest records: the manifest's own checksum, then every file it
describes (each shard and, in ``hidden`` mode, ``teacher_head.safetensors``): present, of the recorded size, of
the recorded sha256.

Used by :meth:`.reader.TeacherCache.open` (before any training step reads the cache) and by ``distillens
cache-teacher --verify``; what it costs is in ``docs/teacher-cache.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .format import HEAD_NAME, MANIFEST_NAME, file_sha256, manifest_checksum


@dataclass(frozen=True)
class Damage:
    """A file of a cache that does not match its manifest, and how."""

    file: str
    problem: str


def rebuild_fix(folder: str | os.PathLike[str]) -> str:
    """The fix for a damaged cache: the build resumes, keeping the files that match and rebuilding the others."""
    return (
        f"rebuild it with distillens cache-teacher --output_dir {folder} and the same arguments "
        "(files that match are kept)"
    )


def damage_line(folder: str | os.PathLike[str], damage: Damage) -> str:
    """One line naming the damaged file, what is wrong and the fix."""
    return f"teacher_cache: {damage.file!r} in {folder} {damage.problem}: {rebuild_fix(folder)}."


def recorded_files(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The files a complete manifest records (``file``, ``bytes``, ``sha256``): the head first, then the shards."""
    files = [dict(manifest["head"])] if manifest.get("head") else []
    return files + [dict(shard) for shard in manifest.get("shards", [])]


def manifest_damage(manifest: Mapping[str, Any]) -> Damage | None:
    """What is wrong with a complete manifest itself: its checksum, or a head it should record and does not."""
    if manifest.get("checksum") != manifest_checksum(manifest):
        return Damage(MANIFEST_NAME, "does not match its own checksum (edited or damaged)")
    if manifest.get("settings", {}).get("mode") == "hidden" and not manifest.get("head"):
        return Damage(MANIFEST_NAME, f"records no sha256 for {HEAD_NAME}")
    return None


def file_damage(folder: Path, record: Mapping[str, Any]) -> Damage | None:
    """Whether the file ``record`` describes is there with its recorded size and sha256 (None: it is)."""
    path = folder / record["file"]
    if not path.is_file():
        return Damage(record["file"], "is missing")
    size = path.stat().st_size
    if size != record["bytes"]:
        return Damage(
            record["file"],
            f"has {size} bytes, but {MANIFEST_NAME} records {record['bytes']} (truncated or changed)",
        )
    if file_sha256(path) != record["sha256"]:
        return Damage(record["file"], f"does not match its sha256 in {MANIFEST_NAME} (damaged or changed)")
    return None


def cache_damage(folder: str | os.PathLike[str], manifest: Mapping[str, Any]) -> list[Damage]:
    """Every way the complete cache in ``folder`` differs from its ``manifest`` (empty: it is whole)."""
    damaged = manifest_damage(manifest)
    if damaged is not None:
        return [damaged]  # the records below cannot be trusted
    found = (file_damage(Path(folder), record) for record in recorded_files(manifest))
    return [damage for damage in found if damage is not None]


def recorded_bytes(manifest: Mapping[str, Any]) -> int:
    """The total size of the files a manifest records."""
    return sum(int(record["bytes"]) for record in recorded_files(manifest))
