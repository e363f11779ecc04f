"""Reading a teacher cache while training: rows found by content hash, signals in the objective's token order."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from safetensors.torch import load_file

from ..heads import LinearHead
from ..response_tokens import response_mask
from ..teacher_signals import TeacherSignals
from ..topk_divergence import TopKDistribution
from .format import (
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

REBUILD = "rebuild it with distillens cache-teacher"


class TeacherCache:
    """A finished teacher cache, its shards memory-mapped, its rows indexed by content hash.

    Use :meth:`open`; :meth:`signals` gives a batch's :class:`TeacherSignals`, :meth:`teacher_head` the cached LM
    head (``hidden`` mode).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], tables: list[pa.Table]) -> None:
        self.path = path
        self.manifest = manifest
        self.settings = CacheSettings.from_json(manifest["settings"])
        self._tables = tables
        self._index: dict[str, tuple[int, int]] = {}
        for table_index, table in enumerate(tables):
            for row, key in enumerate(table.column("row_key").to_pylist()):
                self._index.setdefault(key, (table_index, row))

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> TeacherCache:
        """Open the cache folder ``path``; ValueError (one line) when it is missing, incomplete or not a cache."""
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
        tables = []
        for shard in manifest["shards"]:
            shard_path = folder / shard["file"]
            if not shard_path.is_file() or shard_path.stat().st_size != shard["bytes"]:
                raise ValueError(f"the teacher cache {path} lost or changed {shard['file']}: {REBUILD}.")
            # the map stays open: the table's buffers point into it
            tables.append(pa.ipc.open_stream(pa.memory_map(str(shard_path))).read_all())
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
        # loaded on the CPU, then moved: safetensors refuses device strings such as "cpu:0" (a launched CPU rank)
        tensors = {name: value.to(device) for name, value in load_file(str(self.path / HEAD_NAME)).items()}
        return LinearHead(
            tensors["weight"], tensors.get("bias"), self.settings.logit_scale, self.settings.logit_softcap
        )

    def signals(self, batch: Mapping[str, torch.Tensor], device: torch.device | str) -> TeacherSignals:
        """The cached teacher signals of a padded batch's response tokens, in the objective's order."""
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
            located.append((table, row, count))
        settings = self.settings
        signals = TeacherSignals(output_layer=settings.output_layer)
        for layer in settings.layers:
            if settings.mode == "hidden":
                size = settings.teacher.head_input_size
                parts = [
                    _read(table, hidden_column(layer), row, settings.dtype, (n, size))
                    for table, row, n in located
                ]
                signals.head_inputs[layer] = torch.cat(parts).to(device)
                continue
            k = settings.top_k
            ids = [
                _read(table, ids_column(layer), row, settings.id_dtype, (n, k)).long()
                for table, row, n in located
            ]
            log_probs = [
                _read(table, log_probs_column(layer), row, settings.dtype, (n, k + 1))
                for table, row, n in located
            ]
            signals.topk[layer] = TopKDistribution.from_stored(torch.cat(ids), torch.cat(log_probs)).to(
                device
            )
        return signals


def _read(table: pa.Table, column: str, row: int, dtype: str, shape: tuple[int, int]) -> torch.Tensor:
    return bytes_tensor(table.column(column)[row].as_buffer(), dtype, shape)
