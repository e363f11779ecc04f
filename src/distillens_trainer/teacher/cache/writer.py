"""Building a teacher cache: the teacher's signals at the response tokens of every tokenised row, in shards.

Rows are deduplicated by :func:`~.format.row_key` and cut into shards of ``rows_per_shard`` rows; shard ``i``
is written by process ``i mod world_size`` to a temporary file, its sha256 recorded beside it
(``shard-i.arrow.sha256``), then renamed into place, so an interrupted build resumes by keeping the shards that
exist and match their recorded sha256 (and the same arguments give the same cache); a shard that does not match
(or has no record) is rebuilt. The manifest is written by the main process: first with ``complete: false``, then,
once every shard exists and matches its record, with the shard list, sizes and checksums, the head's and its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from safetensors.torch import save
from torch import nn

from ...data.collation import DataCollatorForCompletionOnly
from ...files import write_json_atomic
from ...loss.heads import LinearHead, linear_head_refusal, output_linear_head
from ...loss.layer_map import LayerPair
from ...loss.lens import LogitLens
from ...loss.response_tokens import response_mask, select_response
from ...loss.topk import stored_log_probs, topk_of_logits
from ...models.facts import forward_accepts, logit_postprocessing, model_vocab_size, with_position_ids
from ...progress import progress
from ...version import __version__
from .format import (
    CACHE_FORMAT,
    CHECKSUM_SUFFIX,
    DTYPES,
    FORMAT_VERSION,
    HEAD_NAME,
    MANIFEST_NAME,
    SHARD_GLOB,
    CacheSettings,
    TeacherIdentity,
    checksum_path,
    differing_fields,
    file_sha256,
    hidden_column,
    id_dtype_for,
    ids_column,
    log_probs_column,
    manifest_checksum,
    read_manifest,
    row_key,
    shard_name,
    tensor_bytes,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from .integrity import Damage, damage_line, file_damage, manifest_damage

logger = logging.getLogger(__name__)

TOKEN_CHUNK = 1024  # response tokens per top-k head product while building (bounds the [n, V] block)


@dataclass(frozen=True)
class CacheRow:
    """One tokenised example to cache."""

    input_ids: list[int]
    labels: list[int]
    key: str


def unique_rows(datasets: Sequence[Any]) -> list[CacheRow]:
    """The rows of the tokenised ``datasets`` (``input_ids`` and ``labels``; None entries skipped), each distinct
    row once, in order of first appearance."""
    rows: list[CacheRow] = []
    seen: set[str] = set()
    for dataset in datasets:
        if dataset is None:
            continue
        for example in dataset:
            input_ids, labels = list(example["input_ids"]), list(example["labels"])
            key = row_key(input_ids, labels)
            if key not in seen:
                seen.add(key)
                rows.append(CacheRow(input_ids, labels, key))
    return rows


def shard_ranges(num_rows: int, rows_per_shard: int) -> list[range]:
    """Row ranges of the shards."""
    return [
        range(start, min(start + rows_per_shard, num_rows)) for start in range(0, num_rows, rows_per_shard)
    ]


def _plan(rows: Sequence[CacheRow], rows_per_shard: int) -> dict[str, Any]:
    return {
        "num_rows": len(rows),
        "rows_per_shard": rows_per_shard,
        "num_shards": len(shard_ranges(len(rows), rows_per_shard)),
    }


# --------------------------------------------------------------------------------------------- the folder
def prepare_cache_dir(
    output_dir: str | os.PathLike[str],
    settings: CacheSettings,
    rows: Sequence[CacheRow],
    rows_per_shard: int,
    *,
    overwrite: bool,
    is_main_process: bool,
    fresh: bool = False,
) -> bool:
    """Check ``output_dir`` and, on the main process, start its manifest; True when an unfinished (or finished)
    build with the same settings is resumed (its files are then checked against their records as it goes on).

    A folder holding something else, or a cache made with other settings, is refused (one line naming what
    differs) unless ``overwrite``, which removes the old cache's files (only those) first; ``fresh`` (with
    ``overwrite``) removes them even when the settings are the same, so the build starts afresh.
    """
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output_dir={str(output_dir)!r} is a file: give a directory path.")
    manifest = read_manifest(folder) if folder.is_dir() else None
    plan = _plan(rows, rows_per_shard)
    new = {"settings": settings.to_json(), "plan": plan}
    resumed = False
    if manifest is not None:
        differs = differing_fields(
            {"settings": manifest.get("settings", {}), "plan": manifest.get("plan", {})}, new
        )
        if not differs and not (fresh and overwrite):
            resumed = True
        elif not overwrite:
            raise ValueError(
                f"{output_dir} holds a teacher cache made with other settings ({', '.join(differs[:4])} differ): "
                "pass --overwrite_output_dir true to replace it, or another --output_dir."
            )
    elif folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ValueError(
            f"output_dir={str(output_dir)!r} is not empty and holds no teacher cache: pass another --output_dir, or "
            "--overwrite_output_dir true to write the cache beside its files."
        )
    if is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if not resumed:
            for path in cache_files(folder):
                path.unlink(missing_ok=True)
        if not resumed or manifest is None:
            write_json_atomic(folder / MANIFEST_NAME, _manifest(new, complete=False))
    return resumed


def cache_files(folder: Path) -> list[Path]:
    """The files a cache build writes in ``folder`` (and only those): what starting afresh removes."""
    shards = sorted(folder.glob(SHARD_GLOB))
    return [
        folder / MANIFEST_NAME,
        folder / HEAD_NAME,
        *shards,
        *folder.glob(f"{SHARD_GLOB}{CHECKSUM_SUFFIX}"),
        *folder.glob(f"{SHARD_GLOB}{CHECKSUM_SUFFIX}.tmp"),
        *folder.glob(".shard-*.tmp"),
        folder / f"{HEAD_NAME}.tmp",
    ]


def _manifest(body: dict[str, Any], *, complete: bool, **extra: Any) -> dict[str, Any]:
    manifest = {
        "format": CACHE_FORMAT,
        "format_version": FORMAT_VERSION,
        "written_by": f"distillens-trainer {__version__}",
        "complete": complete,
        **body,
        **extra,
    }
    manifest = json.loads(json.dumps(manifest))  # as it reads back, so the checksum is of what is read
    return {**manifest, "checksum": manifest_checksum(manifest)}


def recorded_shard_sha256(folder: Path, manifest: dict[str, Any] | None) -> dict[str, str]:
    """The sha256 recorded for each shard of a resumed build: the record beside a shard (written when the shard
    was) wins over the manifest's (an earlier complete build's)."""
    trusted = manifest is not None and manifest_damage(manifest) is None
    recorded = {shard["file"]: shard["sha256"] for shard in manifest.get("shards", [])} if trusted else {}
    for path in folder.glob(f"{SHARD_GLOB}{CHECKSUM_SUFFIX}"):
        try:
            recorded[path.name.removesuffix(CHECKSUM_SUFFIX)] = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue  # an unreadable record: the shard counts as unrecorded and is rebuilt
    return recorded


def shard_damage(path: Path, recorded: dict[str, str]) -> Damage | None:
    """Whether the shard at ``path`` lacks a record or does not match it (None: it matches)."""
    expected = recorded.get(path.name)
    if expected is None:
        return Damage(path.name, "has no recorded sha256")
    return file_damage(path.parent, {"file": path.name, "bytes": path.stat().st_size, "sha256": expected})


def _write_bytes_atomic(path: Path, payload: bytes) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_bytes(payload)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def finish_manifest(
    output_dir: str | os.PathLike[str],
    settings: CacheSettings,
    rows: Sequence[CacheRow],
    rows_per_shard: int,
    recorded: dict[str, str] | None = None,
    head_sha256: str | None = None,
) -> dict[str, Any]:
    """Write the final manifest (main process, once every shard exists): shards with rows, tokens, bytes and
    sha256, the head's, totals, and ``complete: true``; then remove the per-shard records.

    Nothing unverified is recorded: each shard must match the sha256 recorded when it was written (beside it, or
    ``recorded``), and the head ``head_sha256`` (``hidden`` mode); else ValueError (one line naming the file).
    """
    folder = Path(output_dir)
    recorded = {**(recorded or {}), **recorded_shard_sha256(folder, None)}
    shards = []
    num_tokens = 0
    for index, _ in enumerate(shard_ranges(len(rows), rows_per_shard)):
        path = folder / shard_name(index)
        damage = shard_damage(path, recorded) if path.is_file() else Damage(path.name, "is missing")
        if damage is not None:
            raise ValueError(damage_line(folder, damage))
        try:
            table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        except (pa.ArrowException, OSError) as error:
            raise ValueError(
                damage_line(folder, Damage(path.name, f"is no readable Arrow stream ({error})"))
            ) from error
        tokens = int(pa.compute.sum(table.column("num_tokens")).as_py() or 0)
        num_tokens += tokens
        shards.append(
            {
                "file": path.name,
                "rows": table.num_rows,
                "tokens": tokens,
                "bytes": path.stat().st_size,
                "sha256": recorded[path.name],
            }
        )
    head = None
    if settings.mode == "hidden":
        if head_sha256 is None:
            raise ValueError(damage_line(folder, Damage(HEAD_NAME, "was not written by this build")))
        path = folder / HEAD_NAME
        damage = file_damage(folder, {"file": HEAD_NAME, "bytes": path.stat().st_size, "sha256": head_sha256})
        if damage is not None:
            raise ValueError(damage_line(folder, damage))
        head = {"file": HEAD_NAME, "bytes": path.stat().st_size, "sha256": head_sha256}
    body = {"settings": settings.to_json(), "plan": _plan(rows, rows_per_shard)}
    manifest = _manifest(
        body,
        complete=True,
        num_rows=len(rows),
        num_tokens=num_tokens,
        bytes_per_token_per_layer=settings.bytes_per_token_per_layer(),
        head=head,
        shards=shards,
    )
    write_json_atomic(folder / MANIFEST_NAME, manifest)
    for path in folder.glob(f"{SHARD_GLOB}{CHECKSUM_SUFFIX}"):
        path.unlink(missing_ok=True)  # the manifest records them now
    return manifest


def write_teacher_head(
    teacher: nn.Module, lens: LogitLens, head: LinearHead, path: str | os.PathLike[str]
) -> str:
    """The teacher's LM head (``weight``, ``bias``) and final norm (``norm.*``) as safetensors: all a ``hidden``
    cache needs of the teacher's weights (its logit post-processing is in the manifest). Returns the sha256 of
    the bytes written (the same teacher gives the same bytes)."""
    tensors = {"weight": head.weight.detach().cpu().contiguous().clone()}
    if head.bias is not None:
        tensors["bias"] = head.bias.detach().cpu().contiguous().clone()
    if lens.norm is not None:
        for name, value in lens.norm.state_dict().items():
            tensors[f"norm.{name}"] = value.detach().cpu().contiguous().clone()
    # one metadata entry: safetensors writes a map's entries in no fixed order, and the same teacher must give the
    # same bytes (the teacher itself is named in the manifest)
    payload = save(tensors, metadata={"format": CACHE_FORMAT})
    _write_bytes_atomic(Path(path), payload)
    return hashlib.sha256(payload).hexdigest()


# --------------------------------------------------------------------------------------------- the teacher pass
def _schema(settings: CacheSettings) -> pa.Schema:
    columns = [pa.field("row_key", pa.string()), pa.field("num_tokens", pa.int32())]
    for layer in settings.layers:
        if settings.mode == "hidden":
            columns.append(pa.field(hidden_column(layer), pa.binary()))
        else:
            columns += [
                pa.field(ids_column(layer), pa.binary()),
                pa.field(log_probs_column(layer), pa.binary()),
            ]
    return pa.schema(columns, metadata={"format": CACHE_FORMAT})


@torch.no_grad()
def teacher_row_signals(
    teacher: nn.Module,
    lens: LogitLens,
    head: LinearHead | None,
    batch: dict[str, torch.Tensor],
    settings: CacheSettings,
) -> dict[str, list[Any]]:
    """One padded batch through the teacher -> the cache's columns, one entry per row."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    inputs = with_position_ids(inputs, forward_accepts(teacher, "position_ids"))
    outputs = teacher(**inputs, output_hidden_states=True, use_cache=False)
    mask = response_mask(batch["labels"])  # [B, T-1]
    counts = mask.sum(dim=1).tolist()
    columns: dict[str, list[Any]] = {"num_tokens": counts}
    float_dtype = DTYPES[settings.dtype]
    for layer in settings.layers:
        head_input = lens.to_head_input(select_response(outputs.hidden_states[layer], mask), layer)  # [N, d]
        if settings.mode == "hidden":
            columns[hidden_column(layer)] = [
                tensor_bytes(part.to(float_dtype)) for part in head_input.split(counts)
            ]
            continue
        ids, log_probs = [], []
        for start in range(0, head_input.shape[0], TOKEN_CHUNK):
            chunk = head_input[start : start + TOKEN_CHUNK]
            logits = (
                head.logits(chunk, settings.vocab_size)
                if head is not None
                else lens.head_logits(chunk)[:, : settings.vocab_size]
            )
            top = topk_of_logits(logits, settings.top_k, settings.temperature)
            ids.append(top.ids.to(DTYPES[settings.id_dtype]))
            log_probs.append(stored_log_probs(top).to(float_dtype))
        all_ids = torch.cat(ids) if ids else torch.zeros(0, settings.top_k, dtype=DTYPES[settings.id_dtype])
        all_log_probs = (
            torch.cat(log_probs) if log_probs else torch.zeros(0, settings.top_k + 1, dtype=float_dtype)
        )
        columns[ids_column(layer)] = [tensor_bytes(part) for part in all_ids.split(counts)]
        columns[log_probs_column(layer)] = [tensor_bytes(part) for part in all_log_probs.split(counts)]
    return columns


def write_shards(
    teacher: nn.Module,
    lens: LogitLens,
    head: LinearHead | None,
    rows: Sequence[CacheRow],
    settings: CacheSettings,
    output_dir: str | os.PathLike[str],
    *,
    pad_token_id: int,
    batch_size: int,
    rows_per_shard: int,
    rank: int = 0,
    world_size: int = 1,
    show_progress: bool = True,
    recorded: dict[str, str] | None = None,
) -> list[int]:
    """Write this process's shards (``i mod world_size == rank``) that are missing, or that do not match the
    sha256 recorded for them (``recorded``, or the record beside the shard); returns the indices written."""
    folder = Path(output_dir)
    collator = DataCollatorForCompletionOnly(pad_token_id=pad_token_id)
    device = next(teacher.parameters()).device
    schema = _schema(settings)
    mine = [
        (index, rows_of)
        for index, rows_of in enumerate(shard_ranges(len(rows), rows_per_shard))
        if index % world_size == rank
    ]
    recorded = {**(recorded or {}), **recorded_shard_sha256(folder, None)}
    todo = [(index, rows_of) for index, rows_of in mine if not _kept(folder / shard_name(index), recorded)]
    if len(todo) < len(mine):
        logger.info(
            "teacher cache: %d of this process's %d shards already written; resuming.",
            len(mine) - len(todo),
            len(mine),
        )
    written = []
    bar = progress(sum(len(r) for _, r in todo), "caching the teacher", unit="rows", enabled=show_progress)
    for index, rows_of in todo:
        path = folder / shard_name(index)
        tmp = folder / f".{path.name}.rank{rank}.tmp"
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as stream:
            for start in range(rows_of.start, rows_of.stop, batch_size):
                batch_rows = rows[start : min(start + batch_size, rows_of.stop)]
                features = [
                    {"input_ids": r.input_ids, "attention_mask": [1] * len(r.input_ids), "labels": r.labels}
                    for r in batch_rows
                ]
                batch = {key: value.to(device) for key, value in collator(features).items()}
                columns = teacher_row_signals(teacher, lens, head, batch, settings)
                columns["row_key"] = [r.key for r in batch_rows]
                stream.write_batch(pa.record_batch([columns[f.name] for f in schema], schema=schema))
                bar.update(len(batch_rows))
        # the record first: a shard in place always has one (a record without its shard is harmless)
        _write_bytes_atomic(checksum_path(path), f"{file_sha256(tmp)}\n".encode("ascii"))
        os.replace(tmp, path)
        written.append(index)
    bar.close()
    return written


def _kept(path: Path, recorded: dict[str, str]) -> bool:
    """Whether an existing shard matches its record and is kept; one that does not is removed (and rebuilt)."""
    if not path.is_file():
        return False
    damage = shard_damage(path, recorded)
    if damage is None:
        return True
    logger.warning("teacher cache: %s %s: rebuilding it.", path.name, damage.problem)
    path.unlink()
    checksum_path(path).unlink(missing_ok=True)
    return False


# --------------------------------------------------------------------------------------------- one call
def teacher_cache_settings(
    teacher: nn.Module,
    *,
    mode: str,
    layer_map: Sequence[LayerPair],
    vocab_size: int,
    dtype: str = "bfloat16",
    top_k: int = 32,
    temperature: float = 1.0,
    lens_final_norm: bool = True,
    tokenizer: Any | None = None,
    teacher_name: str | None = None,
    teacher_gguf_file: str | None = None,
    config_sha256: str = "",
    prompt_format: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    student: Mapping[str, Any] | None = None,
) -> CacheSettings:
    """The settings of a cache of ``teacher`` for this layer map (the teacher layers it reads, and the output)."""
    lens = LogitLens(teacher, final_norm=lens_final_norm)
    topk = mode == "topk"
    if topk and not 1 <= top_k <= vocab_size:
        raise ValueError(f"--top_k={top_k} must lie in 1..{vocab_size} (the shared vocabulary).")
    scale, softcap = logit_postprocessing(teacher)
    teacher_name = (
        teacher_name
        or getattr(getattr(teacher, "config", None), "_name_or_path", "")
        or type(teacher).__name__
    )
    return CacheSettings(
        mode=mode,
        dtype=dtype,
        top_k=top_k if topk else None,
        id_dtype=id_dtype_for(vocab_size) if topk else None,
        temperature=temperature if topk else None,
        teacher=TeacherIdentity(
            name_or_path=teacher_name,
            gguf_file=teacher_gguf_file,
            dtype=str(next(teacher.parameters()).dtype).removeprefix("torch."),
            num_layers=lens.num_layers,
            vocab_rows=model_vocab_size(teacher),
            head_input_size=int(lens.head.weight.shape[1]),
            config_sha256=config_sha256,
            weights_fingerprint=weights_fingerprint(teacher),
        ),
        tokenizer_sha256=tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        vocab_size=vocab_size,
        layers=tuple(sorted({teacher_layer for _, teacher_layer in layer_map} | {lens.num_layers})),
        layer_map=tuple(tuple(pair) for pair in layer_map),
        lens_final_norm=lens_final_norm,
        logit_scale=scale,
        logit_softcap=softcap,
        prompt_format=dict(prompt_format or {}),
        data=dict(data or {}),
        student=dict(student or {}),
    )


def write_teacher_cache(
    teacher: nn.Module,
    datasets: Sequence[Any],
    settings: CacheSettings,
    output_dir: str | os.PathLike[str],
    *,
    pad_token_id: int,
    batch_size: int = 8,
    rows_per_shard: int = 256,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    show_progress: bool = True,
    fresh: bool = False,
) -> dict[str, Any] | None:
    """Build (or finish, or repair) a cache of ``teacher`` over the tokenised ``datasets`` in ``output_dir``.

    Every process of a launched run calls it with its ``rank`` and a ``barrier``; each writes its own shards and
    the main process the head and the manifest, which it returns (the others get None). The shards an earlier
    build left are kept only where they match their recorded sha256; the others are rebuilt. ``overwrite`` and
    ``fresh`` together start afresh (see :func:`prepare_cache_dir`).
    """
    head = output_linear_head(teacher)
    if settings.mode == "hidden" and head is None:
        refusal = linear_head_refusal(teacher.get_output_embeddings())
        raise ValueError(
            f"a hidden cache needs the teacher's LM head as a plain linear layer ({refusal}): use --cache_mode topk."
        )
    rows = unique_rows(datasets)
    folder = Path(output_dir)
    is_main = rank == 0
    manifest = read_manifest(folder) if folder.is_dir() else None  # before prepare_cache_dir may replace it
    resumed = prepare_cache_dir(
        folder, settings, rows, rows_per_shard, overwrite=overwrite, is_main_process=is_main, fresh=fresh
    )
    barrier()
    recorded = recorded_shard_sha256(folder, manifest if resumed else None)
    lens = LogitLens(teacher, final_norm=settings.lens_final_norm)
    head_sha256 = None
    if is_main and settings.mode == "hidden":  # always rewritten: a few MB, and its bytes are then known good
        head_sha256 = write_teacher_head(teacher, lens, head, folder / HEAD_NAME)
    was_training = teacher.training
    teacher.eval()
    try:
        write_shards(
            teacher, lens, head, rows, settings, folder,
            pad_token_id=pad_token_id, batch_size=batch_size, rows_per_shard=rows_per_shard,
            rank=rank, world_size=world_size, show_progress=show_progress and is_main, recorded=recorded,
        )  # fmt: skip
    finally:
        teacher.train(was_training)
    barrier()
    if not is_main:
        return None
    return finish_manifest(folder, settings, rows, rows_per_shard, recorded, head_sha256)
