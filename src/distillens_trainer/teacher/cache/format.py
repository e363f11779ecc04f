"""The on-disk layout of a teacher cache: file names, the settings that identify a cache, row keys, tensor bytes.

A cache folder holds::

    manifest.json               what the cache was made from (CacheSettings), its shards and head with their sizes
                                and sha256, "complete", and the sha256 of its own content ("checksum")
    teacher_head.safetensors    hidden mode: the teacher's LM head (weight, bias) and final norm ("norm.*")
    shard-00000.arrow ...       Arrow IPC stream files (datasets.Dataset.from_file opens them), one row per
                                tokenised example: row_key, num_tokens and one binary column per tensor
    shard-00000.arrow.sha256    while a build is unfinished: the sha256 of each shard written so far (removed
                                once the complete manifest records them)

Columns per cached teacher ``hidden_states`` index ``L`` (the mapped lens layers and the teacher's last):
``hidden`` mode ``h{L}``: ``[num_tokens, d]`` LM-head inputs (after the final norm) in ``dtype``; ``topk`` mode
``ids{L}``: ``[num_tokens, k]`` token ids in ``id_dtype`` and ``logp{L}``: ``[num_tokens, k + 1]`` bucket
log-probabilities in ``dtype`` (the k tokens, then the tail; a dead row is all ``-inf``). Tensors are stored as
their raw little-endian bytes, row-major, response positions only, in position order.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

CACHE_FORMAT = "distillens-teacher-cache"
FORMAT_VERSION = 2  # 2: the head's sha256 and the manifest's own checksum are recorded
MANIFEST_NAME = "manifest.json"
HEAD_NAME = "teacher_head.safetensors"
SHARD_GLOB = "shard-*.arrow"
CHECKSUM_SUFFIX = ".sha256"
CACHE_MODES: tuple[str, ...] = ("hidden", "topk")
CACHE_DTYPES: tuple[str, ...] = ("bfloat16", "float32")
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "uint16": torch.uint16,
    "int32": torch.int32,
}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def checksum_path(path: Path) -> Path:
    """Where the sha256 of a shard written by an unfinished build is kept (``shard-00000.arrow.sha256``)."""
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def hidden_column(layer: int) -> str:
    return f"h{layer}"


def ids_column(layer: int) -> str:
    return f"ids{layer}"


def log_probs_column(layer: int) -> str:
    return f"logp{layer}"


def id_dtype_for(vocab_size: int) -> str:
    """Token ids take 2 bytes up to 65,536 tokens, else 4."""
    return "uint16" if vocab_size <= 2**16 else "int32"


@dataclass(frozen=True)
class TeacherIdentity:
    """Which teacher a cache was made from: where it was loaded, its shape and a fingerprint of its weights."""

    name_or_path: str
    gguf_file: str | None
    dtype: str
    num_layers: int
    vocab_rows: int
    head_input_size: int
    config_sha256: str
    weights_fingerprint: str


@dataclass(frozen=True)
class CacheSettings:
    """Everything that decides a cache's contents: a resumed build must match it exactly, and training checks
    the fields that decide what it reads (mode, tokenizer, vocabulary, layers, lens norm, temperature, format).

    Attributes:
        mode: ``hidden`` or ``topk``.
        dtype: stored float dtype (``bfloat16`` or ``float32``).
        top_k / id_dtype: topk mode only (else None).
        temperature: the softmax temperature of the stored top-k log-probabilities (topk mode; else None).
        teacher: :class:`TeacherIdentity`.
        tokenizer_sha256: fingerprint of the tokenizer the rows were tokenised with (None: not recorded).
        vocab_size: the shared real vocabulary (columns compared).
        layers: cached teacher ``hidden_states`` indices, ascending; the last is the teacher's output.
        layer_map: the (student, teacher) pairs the cache was resolved for.
        lens_final_norm: whether the final norm was applied to intermediate layers.
        logit_scale / logit_softcap: the teacher head's logit post-processing (hidden mode applies it).
        prompt_format: the data fields that decide tokenisation (template, columns, length limits).
        data: every data option (sources and sizes too): decides which rows a build holds.
        student: the student the layer map was resolved against (name, number of layers).
    """

    mode: str
    dtype: str
    top_k: int | None
    id_dtype: str | None
    temperature: float | None
    teacher: TeacherIdentity
    tokenizer_sha256: str | None
    vocab_size: int
    layers: tuple[int, ...]
    layer_map: tuple[tuple[int, int], ...]
    lens_final_norm: bool
    logit_scale: float | None = None
    logit_softcap: float | None = None
    prompt_format: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)
    student: Mapping[str, Any] = field(default_factory=dict)

    @property
    def output_layer(self) -> int:
        return self.teacher.num_layers

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples become lists, as they read back

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> CacheSettings:
        values = dict(values)
        values["teacher"] = TeacherIdentity(**values["teacher"])
        values["layers"] = tuple(values["layers"])
        values["layer_map"] = tuple(tuple(pair) for pair in values["layer_map"])
        return cls(**values)

    def bytes_per_token(self) -> int:
        """Disk bytes per response token for all cached layers (the Arrow framing aside)."""
        return len(self.layers) * self.bytes_per_token_per_layer()

    def bytes_per_token_per_layer(self) -> int:
        """``hidden``: d · s; ``topk``: k · i + (k + 1) · s, with s the float and i the id size in bytes."""
        float_bytes = DTYPES[self.dtype].itemsize
        if self.mode == "hidden":
            return self.teacher.head_input_size * float_bytes
        return self.top_k * DTYPES[self.id_dtype].itemsize + (self.top_k + 1) * float_bytes


def differing_fields(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the (nested) fields whose values differ between two JSON-like mappings."""
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            names += differing_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names


# --------------------------------------------------------------------------------------------- row keys
def row_key(input_ids: Sequence[int], labels: Sequence[int]) -> str:
    """The content hash of one tokenised example (its tokens and its label mask): how a cache finds a row
    whatever the order, filtering or batching of the data."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(input_ids, dtype=np.int64).tobytes())
    digest.update(b"|")
    digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def batch_row_keys(batch: Mapping[str, torch.Tensor]) -> list[str]:
    """:func:`row_key` of every row of a padded batch (``input_ids``, ``labels``, ``attention_mask``)."""
    input_ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    attention_mask = batch.get("attention_mask")
    keys = []
    for index in range(input_ids.shape[0]):
        real = attention_mask[index].cpu().bool() if attention_mask is not None else slice(None)
        keys.append(row_key(input_ids[index][real].tolist(), labels[index][real].tolist()))
    return keys


# --------------------------------------------------------------------------------------------- tensor bytes
def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's raw bytes, row-major, for a binary column."""
    return tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def bytes_tensor(buffer: Any, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` from a binary column's bytes (copied: the result is writable)."""
    return torch.frombuffer(bytearray(buffer), dtype=DTYPES[dtype]).reshape(*shape)


# --------------------------------------------------------------------------------------------- fingerprints
def config_fingerprint(config: Any) -> str:
    """sha256 of a model config's architecture fields (not its path, dtype or library version)."""
    values = {
        key: value
        for key, value in config.to_dict().items()
        if not key.startswith("_") and key not in ("transformers_version", "dtype", "torch_dtype")
    }
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of a tokenizer's vocabulary and special tokens."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]),
        "special": sorted(getattr(tokenizer, "all_special_tokens", ())),
        "length": len(tokenizer),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def weights_fingerprint(model: torch.nn.Module, samples: int = 4096) -> str:
    """sha256 over every parameter's name, shape, dtype and up to ``samples`` evenly strided values: tells
    checkpoints apart in about a second, whatever the model's size."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // samples)
            digest.update(tensor_bytes(flat[::step].float()))
    return digest.hexdigest()


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of a cache folder; None when the folder holds none; ValueError when it is not a cache's."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path} cannot be read ({type(error).__name__}): it is not a teacher cache's manifest."
        ) from error
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not a distillens teacher cache manifest (no format {CACHE_FORMAT!r}).")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {manifest.get('format_version')}; this distillens-trainer reads "
            f"version {FORMAT_VERSION}: rebuild the cache with distillens cache-teacher --overwrite_output_dir true."
        )
    return manifest


def file_sha256(path: Any) -> str:
    """The sha256 of a file's bytes (read in 8 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """The sha256 of a manifest's content (its canonical JSON without the ``checksum`` field itself)."""
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True).encode()).hexdigest()
