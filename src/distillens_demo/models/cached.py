"""The teacher and the initial student every method starts from, cached or trained: loaded from the demo's cache
folder (:mod:`.store`) when an entry with these settings is there, else trained with :func:`.training.train_model`
and stored."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..arguments import CACHE_FORMAT, TEACHER_OBJECTIVE, DemoArguments
from .store import load_cached_model, stable_hash, store_model, suite_key, teacher_cache_path, teacher_key
from .training import build_model, train_model
from .training_data import Suite, prepare_suite

logger = logging.getLogger(__name__)


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
    path = args.resolved_cache_dir / f"student-init-{stable_hash(key)}"
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
