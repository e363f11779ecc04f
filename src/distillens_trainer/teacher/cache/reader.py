"""Reading a teacher cache while training: rows found by content hash, signals in the objective's token order."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ...loss.heads import LinearHead
from ...loss.response_tokens import response_mask
from ...loss.teacher_signals import CachedHeadInputs, CachedTopK
from ...loss.topk import TopKDistribution
from .format import (
    DTYPES,
    HEAD_NAME,
    CacheSettings,
    batch_row_keys,
    bytes_tensor,
    hidden_column,
    ids_column,
    log_probs_column,
    read_manifest,
    row_key,
)
from .integrity import Damage, cache_damage, damage_line, recorded_bytes, recorded_files

logger = logging.getLogger(__name__)

REBUILD = "rebuild it with distillens cache-teacher"


class TeacherCache:
    """A finished teacher cache, its shards memory-mapped, its rows indexed by content hash.

    Use :meth:`open`; :meth:`signals` gives a batch's teacher signals, :meth:`teacher_head` the cached LM
    head (``hidden`` mode).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], tables: list[pa.Table]) -> None:
        self.path = path
        self.manifest = manifest
        self.settings = CacheSettings.from_json(manifest["settings"])
        self._tables = tables
        self._files = [shard["file"] for shard in manifest["shards"]]
        self._index: dict[str, tuple[int, int]] = {}
        for table_index, table in enumerate(tables):
            for row, key in enumerate(table.column("row_key").to_pylist()):
                self._index.setdefault(key, (table_index, row))

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify: bool = True) -> TeacherCache:
        """Open the cache folder ``path``; ValueError (one line) when it is missing, incomplete or not a cache, or
        (``verify``, the default) when a file it records does not match its size and sha256 in the manifest."""
        folder = Path(path)
        manifest = checked_manifest(path, verify=verify)
        tables = []
        for shard in manifest["shards"]:
            shard_path = folder / shard["file"]
            if not shard_path.is_file() or shard_path.stat().st_size != shard["bytes"]:
                raise ValueError(
                    damage_line(path, Damage(shard["file"], "is missing or not of its recorded size"))
                )
            try:  # the map stays open: the table's buffers point into it
                tables.append(pa.ipc.open_stream(pa.memory_map(str(shard_path))).read_all())
            except (pa.ArrowException, OSError) as error:
                raise ValueError(
                    damage_line(path, Damage(shard["file"], f"is no readable Arrow stream ({error})"))
                ) from error
        return cls(folder, manifest, tables)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def missing_rows(self, dataset: Iterable[Mapping[str, Any]]) -> tuple[int, int, int | None]:
        """(missing, total, index of the first missing) over the tokenised rows of ``dataset``."""
        missing, total, first = 0, 0, None
        for index, example in enumerate(dataset):
            total += 1
            if row_key(example["input_ids"], example["labels"]) not in self._index:
                missing += 1
                first = index if first is None else first
        return missing, total, first

    def check_rows(self, dataset: Any, name: str) -> None:
        """ValueError (one line) unless every row of the tokenised ``dataset`` is in the cache."""
        if dataset is None or not {"input_ids", "labels"} <= set(
            getattr(dataset, "column_names", None) or ()
        ):
            return
        missing, total, first = self.missing_rows(dataset)
        if missing:
            raise ValueError(
                f"{missing} of {total} {name} rows (the first: row {first}) are not in the teacher cache {self.path}: "
                f"{REBUILD} on this data, with the same prompt format and length limits."
            )

    def teacher_head(self, device: torch.device | str) -> LinearHead:
        """The cached teacher LM head with its logit post-processing (``hidden`` mode)."""
        path = self.path / HEAD_NAME
        if not path.is_file():
            raise ValueError(damage_line(self.path, Damage(HEAD_NAME, "is missing")))
        try:  # loaded on the CPU, then moved: safetensors refuses device strings such as "cpu:0" (a CPU rank)
            loaded = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(
                damage_line(self.path, Damage(HEAD_NAME, f"cannot be read ({error})"))
            ) from error
        if "weight" not in loaded:
            raise ValueError(damage_line(self.path, Damage(HEAD_NAME, "holds no 'weight' tensor")))
        tensors = {name: value.to(device) for name, value in loaded.items()}
        return LinearHead(
            tensors["weight"], tensors.get("bias"), self.settings.logit_scale, self.settings.logit_softcap
        )

    def signals(
        self, batch: Mapping[str, torch.Tensor], device: torch.device | str, head: LinearHead | None = None
    ) -> CachedHeadInputs | CachedTopK:
        """The cached teacher signals of a padded batch's response tokens, in the objective's order: a ``hidden``
        cache's head inputs (with ``head``, the cached LM head of :meth:`teacher_head`, which its terms need) or a
        ``topk`` cache's buckets."""
        keys = batch_row_keys(batch)
        counts = response_mask(batch["labels"]).sum(dim=1).tolist()
        located = []
        for position, (key, count) in enumerate(zip(keys, counts)):
            if key not in self._index:
                raise ValueError(
                    f"batch row {position} is not in the teacher cache {self.path}: {REBUILD} on this data."
                )
            table_index, row = self._index[key]
            table = self._tables[table_index]
            if table.column("num_tokens")[row].as_py() != count:
                raise ValueError(
                    f"the teacher cache {self.path} holds {key} with another token count: {REBUILD}."
                )
            located.append((table, row, count, self._files[table_index]))
        settings = self.settings
        if settings.mode == "hidden":
            size = settings.teacher.head_input_size
            head_inputs = {
                layer: torch.cat(
                    [
                        self._read(table, file, hidden_column(layer), row, settings.dtype, (n, size))
                        for table, row, n, file in located
                    ]
                ).to(device)
                for layer in settings.layers
            }
            return CachedHeadInputs(settings.output_layer, head_inputs, head, str(self.path))
        k = settings.top_k
        topk = {}
        for layer in settings.layers:
            ids = [
                self._checked_ids(
                    self._read(table, file, ids_column(layer), row, settings.id_dtype, (n, k)).long(), file
                )
                for table, row, n, file in located
            ]
            log_probs = [
                self._read(table, file, log_probs_column(layer), row, settings.dtype, (n, k + 1))
                for table, row, n, file in located
            ]
            topk[layer] = TopKDistribution.from_stored(torch.cat(ids), torch.cat(log_probs)).to(device)
        return CachedTopK(settings.output_layer, topk, str(self.path))

    def _read(
        self, table: pa.Table, file: str, column: str, row: int, dtype: str, shape: tuple[int, int]
    ) -> torch.Tensor:
        """One row's tensor of ``column``; ValueError (one line) when its bytes do not make the shape."""
        buffer = table.column(column)[row].as_buffer()
        expected = shape[0] * shape[1] * DTYPES[dtype].itemsize
        if buffer is None or buffer.size != expected:
            found = 0 if buffer is None else buffer.size
            raise ValueError(
                damage_line(
                    self.path,
                    Damage(file, f"holds {found} bytes in column {column}, not {expected} (damaged)"),
                )
            )
        return bytes_tensor(buffer, dtype, shape)

    def _checked_ids(self, ids: torch.Tensor, file: str) -> torch.Tensor:
        """Top-k token ids, checked to lie in the cache's vocabulary (a corrupted id would index out of range)."""
        vocab_size = self.settings.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
            raise ValueError(
                damage_line(
                    self.path,
                    Damage(
                        file,
                        f"holds top-k token id {bad}, outside the vocabulary 0..{vocab_size - 1} (damaged)",
                    ),
                )
            )
        return ids


def checked_manifest(path: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]:
    """The manifest of the complete cache in ``path``, every file it records checked (``verify``); ValueError (one
    line) when the folder is missing, holds no complete cache, or a file does not match its record.

    ``distillens train`` calls it before loading any weights; the trainer's :meth:`TeacherCache.open` calls it
    again, which re-hashes nothing that this process verified and that has not changed since (size, mtime, inode).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(
            f"teacher_cache={str(path)!r} is not a folder: give the output_dir of distillens cache-teacher."
        )
    manifest = read_manifest(folder)
    if manifest is None:
        raise ValueError(
            f"teacher_cache={str(path)!r} holds no manifest.json: give the output_dir of distillens cache-teacher."
        )
    if not manifest.get("complete"):
        raise ValueError(
            f"the teacher cache {path} is incomplete (its build was interrupted): rerun distillens cache-teacher "
            "with the same arguments to finish it."
        )
    if verify:
        verify_cache(folder, manifest)
    return manifest


# (folder, manifest checksum) -> the (file, size, mtime, inode) of every file this process found whole
_VERIFIED: dict[tuple[str, str | None], tuple[tuple[str, int, int, int], ...]] = {}


def _stat_signature(folder: Path, manifest: dict[str, Any]) -> tuple[tuple[str, int, int, int], ...]:
    signature = []
    for record in recorded_files(manifest):
        try:
            stat = (folder / record["file"]).stat()
        except OSError:
            return ()
        signature.append((record["file"], stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return tuple(signature)


def verify_cache(folder: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    """ValueError (one line naming the first damaged file, and how many more there are) unless every file the
    complete ``manifest`` records matches its size and sha256; logs what it checked and how long it took."""
    key = (str(Path(folder).resolve()), manifest.get("checksum"))
    signature = _stat_signature(Path(folder), manifest)
    if signature and _VERIFIED.get(key) == signature:
        return  # verified by this process, unchanged since
    start = time.perf_counter()
    damaged = cache_damage(folder, manifest)
    if damaged:
        first = damaged[0]
        more = f" (and {len(damaged) - 1} more files do not match)" if len(damaged) > 1 else ""
        raise ValueError(damage_line(folder, Damage(first.file, first.problem + more)))
    logger.info(
        "teacher cache %s: %.1f MiB in %d files match their sha256 (checked in %.1f s).",
        folder,
        recorded_bytes(manifest) / 2**20,
        len(manifest.get("shards", [])) + bool(manifest.get("head")),
        time.perf_counter() - start,
    )
    _VERIFIED[key] = signature
