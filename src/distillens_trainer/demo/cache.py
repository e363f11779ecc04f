"""The on-disk cache of the demo's SFT teacher and of the warmed-up initial student, one folder per setting
under ``<cache_dir>``, keyed by a hash of everything the model depends on."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..files import write_json_atomic
from ..model_info import write_model_info
from .arguments import CACHE_FORMAT, TEACHER_INFO_NAME, TEACHER_OBJECTIVE, DemoArguments
from .training import Suite, build_model, prepare_suite, suite_key, train_model

logger = logging.getLogger(__name__)


def _stable_hash(payload: Mapping[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def teacher_key(args: DemoArguments) -> dict[str, Any]:
    """Everything the trained teacher (and its tokenizer) depends on."""
    import transformers

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
    return args.resolved_cache_dir / f"teacher-{_stable_hash(teacher_key(args))}"


def load_cached_model(path: Path) -> tuple[Any, Any, dict[str, Any]] | None:
    """(model, tokenizer, info) from a complete cache entry, or None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        write_model_info(staging, prompt_template=prompt_template)
        if info is not None:
            write_json_atomic(staging / TEACHER_INFO_NAME, info)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
        path.chmod(0o755)  # mkdtemp made it private; models are meant to be shared
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if info is None or not (path / TEACHER_INFO_NAME).is_file():  # another run may have won the race
            raise


def get_teacher(args: DemoArguments, data_dir: Path, work_dir: Path) -> tuple[Any, Suite, dict[str, Any]]:
    """The SFT teacher and the suite: loaded from the cache when present, else trained and cached.

    Returns ``(teacher, suite, info)``; ``info["cached"]`` says whether the cache was used.
    """
    path = teacher_cache_path(args)
    cached = load_cached_model(path)
    if cached is not None:
        teacher, tokenizer, info = cached
        logger.info("[demo] reusing the cached teacher %s", path)
        suite = prepare_suite(args, data_dir, tokenizer)
        tokenizer.save_pretrained(str(data_dir.parent / "tokenizer"))
        return teacher, suite, {**info, "cached": True, "path": str(path)}

    logger.info("[demo] no cached teacher at %s: training one", path)
    suite = prepare_suite(args, data_dir)
    teacher = build_model(suite.tokenizer, args.teacher_layers, args.teacher_hidden_size, args.teacher_seed)
    run = train_model(
        teacher,
        suite,
        objective=TEACHER_OBJECTIVE,
        output_dir=work_dir / "teacher",
        max_steps=args.teacher_max_steps,
        learning_rate=args.teacher_learning_rate,
        batch_size=args.batch_size,
        seed=args.teacher_seed,
        logging_steps=args.logging_steps,
        description="the teacher (SFT)",
    )
    info = {**run.as_dict(), "key": teacher_key(args)}
    store_model(path, teacher, suite.tokenizer, info, prompt_template=args.prompt_template)
    logger.info("[demo] cached the teacher at %s", path)
    return teacher, suite, {**info, "cached": False, "path": str(path)}


def student_init_key(args: DemoArguments, seed: int) -> dict[str, Any]:
    """Everything the warm-started initial student depends on (the data and tokenizer, not the teacher)."""
    return {
        "format": CACHE_FORMAT,
        "suite": suite_key(args),
        "layers": args.student_layers,
        "hidden_size": args.student_hidden_size,
        "warmup_steps": args.student_warmup_steps,
        "learning_rate": args.student_warmup_learning_rate,
        "batch_size": args.batch_size,
        "seed": seed,
    }


def get_student_init(
    args: DemoArguments, suite: Suite, work_dir: Path, seed: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """The initial student every method starts from: random weights (seeded), then, unless
    ``student_warmup_steps`` is 0, that many SFT steps; the warmed-up student is cached like the teacher.

    Returns ``(student, info)``; ``info`` holds ``warmup_steps``, ``cached`` and the warm-up's losses.
    """
    seed = args.seed if seed is None else seed
    student = build_model(suite.tokenizer, args.student_layers, args.student_hidden_size, seed)
    if args.student_warmup_steps == 0:
        return student, {"warmup_steps": 0, "cached": False, "seed": seed}
    key = student_init_key(args, seed)
    path = args.resolved_cache_dir / f"student-init-{_stable_hash(key)}"
    cached = load_cached_model(path)
    if cached is not None:
        logger.info("[demo] reusing the cached warmed-up student %s", path)
        student, _, info = cached
        return student, {**info, "cached": True, "path": str(path)}
    run = train_model(
        student,
        suite,
        objective=TEACHER_OBJECTIVE,
        output_dir=work_dir / f"student-init-{seed}",
        max_steps=args.student_warmup_steps,
        learning_rate=args.student_warmup_learning_rate,
        batch_size=args.batch_size,
        seed=seed,
        logging_steps=args.logging_steps,
        description=f"the initial student (SFT warm-up, seed {seed})",
    )
    info = {**run.as_dict(), "key": key, "warmup_steps": args.student_warmup_steps, "seed": seed}
    store_model(path, student, suite.tokenizer, info, prompt_template=args.prompt_template)
    return student, {**info, "cached": False, "path": str(path)}
