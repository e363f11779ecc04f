"""The on-disk cache of the demo's SFT teacher and of the warmed-up initial student, one folder per setting
under ``<cache_dir>``, keyed by a hash of everything the model depends on; also the keys of the teacher caches
(``teacher-signals-<hash>``) the cache methods train from. Training a missing entry is :mod:`.cached`'s job."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillens_trainer.files import give_user_modes, make_staging_dir, write_json_atomic
from distillens_trainer.models.info import write_model_info
from distillens_trainer.teacher.cache.format import FORMAT_VERSION

from ..arguments import CACHE_FORMAT, TEACHER_INFO_NAME, DemoArguments

logger = logging.getLogger(__name__)


def suite_key(args: DemoArguments) -> dict[str, Any]:
    """What determines the data and the tokenizer."""
    return {
        "tasks": list(args.tasks),
        "num_train": args.num_train,
        "num_eval": args.num_eval,
        "num_test": args.num_test,
        "data_seed": args.data_seed,
        "vocab_size": args.vocab_size,
        "prompt_template": args.prompt_template,
    }


def stable_hash(payload: Mapping[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def teacher_key(args: DemoArguments) -> dict[str, Any]:
    """Everything the trained teacher (and its tokenizer) depends on."""
    return {
        "format": CACHE_FORMAT,
        "suite": suite_key(args),
        "layers": args.teacher_layers,
        "hidden_size": args.teacher_hidden_size,
        "max_steps": args.teacher_max_steps,
        "learning_rate": args.teacher_learning_rate,
        "batch_size": args.batch_size,
        "seed": args.teacher_seed,
        "transformers": transformers.__version__.split(".")[0],
    }


def teacher_cache_path(args: DemoArguments) -> Path:
    """``<cache_dir>/teacher-<hash of teacher_key>``."""
    return args.resolved_cache_dir / f"teacher-{stable_hash(teacher_key(args))}"


def teacher_signals_key(
    args: DemoArguments, cache: Mapping[str, Any], layer_map: Sequence[Sequence[int]], vocab_size: int
) -> dict[str, Any]:
    """Everything a teacher cache of a cache method depends on: the teacher (and with it the suite), the cache's
    settings (``cache``: a method's ``teacher_cache`` entry), the lens layer map and the shared vocabulary."""
    return {
        "format": CACHE_FORMAT,
        "cache_format": FORMAT_VERSION,
        "teacher": teacher_key(args),
        "cache": dict(cache),
        "layer_map": [list(pair) for pair in layer_map],
        "vocab_size": vocab_size,
    }


def teacher_signals_path(args: DemoArguments, key: Mapping[str, Any]) -> Path:
    """``<cache_dir>/teacher-signals-<hash of key>`` (``key``: :func:`teacher_signals_key`)."""
    return args.resolved_cache_dir / f"teacher-signals-{stable_hash(key)}"


def load_cached_model(path: Path) -> tuple[Any, Any, dict[str, Any]] | None:
    """(model, tokenizer, info) from a complete cache entry, or None."""
    info_path = path / TEACHER_INFO_NAME
    if not info_path.is_file():  # written last: its absence means an incomplete entry
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        teacher = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError, json.JSONDecodeError) as error:
        logger.warning("[demo] ignoring the unreadable cache entry %s (%s)", path, error)
        return None
    teacher.eval()
    return teacher, tokenizer, info


def store_model(
    path: Path, model: Any, tokenizer: Any, info: Mapping[str, Any] | None, *, prompt_template: str
) -> None:
    """Save the model, its tokenizer, ``distillens.json`` (the prompt format) and, for a cache entry, ``info``
    into a temporary sibling folder, then rename it into place (safe against concurrent runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(path.parent, path.name)
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        write_model_info(staging, prompt_template=prompt_template)
        if info is not None:
            write_json_atomic(staging / TEACHER_INFO_NAME, info)
        give_user_modes(staging)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if info is None or not (path / TEACHER_INFO_NAME).is_file():  # another run may have won the race
            raise
