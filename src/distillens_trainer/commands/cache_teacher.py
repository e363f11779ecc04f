"""``distillens cache-teacher``: run the teacher once over the training (and evaluation) data and keep what the
objective reads of it, so ``distillens train --teacher_cache C`` distils without the teacher's body.

It takes the same data, teacher and lens fields as ``distillens train`` (the same config file works) and
tokenises exactly as ``train`` does; the student (``--model_name_or_path``) is read only for its tokenizer and
to resolve the layer map.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..config import DistillLensConfig
from ..data.arguments import DataArguments
from ..data.building import build_datasets
from ..files import check_output_dir, folder_contents, writing_into
from ..models.facts import check_fits_contexts
from ..models.info import choose_prompt_template, decided_prompt_template
from ..models.loading import ModelArguments, load_student_tokenizer, read_config
from ..teacher.cache.format import MANIFEST_NAME, read_manifest
from ..teacher.cache.integrity import cache_damage, damage_line, recorded_bytes, recorded_files
from ..teacher.cache.settings import CacheArguments, cache_settings
from ..teacher.cache.writer import write_teacher_cache
from ..teacher.frozen import (
    load_frozen_teacher,
    load_teacher_tokenizer,
    read_teacher_config,
    resolve_teacher_dtype,
)
from .parsing import _Parser, expand_config_file, given_fields, parse_command
from .process import check_launched_world_size

logger = logging.getLogger(__name__)


CACHE_TEACHER_ARGUMENTS = (ModelArguments, DataArguments, DistillLensConfig, CacheArguments)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def build_teacher_cache(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DistillLensConfig,
    cache_args: CacheArguments,
    *,
    overwrite_output_dir: bool = False,
    choose_prompt_format: Callable[..., str] | None = None,
) -> dict[str, Any] | None:
    """Build (or finish) the cache in ``training_args.output_dir``; the manifest on the main process, else None.
    ``choose_prompt_format(tokenizer=...)``, when given, sets ``data_args.prompt_template`` once the student's
    tokenizer has loaded."""
    if not training_args.teacher_model_name_or_path:
        raise ValueError("distillens cache-teacher needs the teacher: pass --teacher_model_name_or_path.")
    if training_args.teacher_cache:
        raise ValueError(
            "--teacher_cache is where train reads a cache; cache-teacher writes one to --output_dir: drop it."
        )
    # Writable, not under a file: before any weights (whether a non-empty one may be reused, the writer decides).
    check_output_dir(training_args.output_dir, allowed=True, how_to_allow="")
    check_launched_world_size(training_args)
    student_config = read_config(
        model_args.model_name_or_path, model_args.gguf_file, trust_remote_code=model_args.trust_remote_code
    )
    if student_config is None:
        raise ValueError(
            f"--model_name_or_path={model_args.model_name_or_path!r} has no readable config: give the student's "
            "folder (it resolves the layer map)."
        )
    teacher_config = read_teacher_config(
        training_args.teacher_model_name_or_path,
        training_args.teacher_gguf_file,
        trust_remote_code=model_args.trust_remote_code,
    )
    check_fits_contexts(  # before any weights are read
        data_args.max_length,
        {"student": student_config, "teacher": teacher_config},
        setting="--max_length",
        fix="pass --max_length {limit} or less (and --max_prompt_length below it)",
    )
    tokenizer = load_student_tokenizer(model_args)
    if choose_prompt_format is not None:
        data_args.prompt_template = choose_prompt_format(tokenizer=tokenizer)
    train, evaluation = build_datasets(
        data_args,
        tokenizer,
        main_process_first=partial(training_args.main_process_first, desc="tokenising the datasets"),
    )
    if train is None:
        raise ValueError("no training data: pass --train_file or --dataset_name.")
    dtype = resolve_teacher_dtype(
        training_args.teacher_dtype, bf16=training_args.bf16, fp16=training_args.fp16
    )
    teacher = load_frozen_teacher(
        training_args.teacher_model_name_or_path,
        dtype,
        gguf_file=training_args.teacher_gguf_file,
        device=training_args.device,
    )
    teacher_tokenizer = load_teacher_tokenizer(
        training_args.teacher_model_name_or_path, training_args.teacher_gguf_file
    )
    settings = cache_settings(
        teacher,
        tokenizer,
        teacher_tokenizer,
        student_config,
        model_args,
        data_args,
        training_args,
        cache_args,
    )
    return write_teacher_cache(
        teacher,
        [train, evaluation],
        settings,
        training_args.output_dir,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=training_args.per_device_eval_batch_size,
        rows_per_shard=cache_args.rows_per_shard,
        overwrite=overwrite_output_dir,
        fresh=overwrite_output_dir,
        rank=training_args.process_index,
        world_size=training_args.world_size,
        barrier=_barrier,
        show_progress=not training_args.disable_tqdm,
    )


def summary_line(manifest: dict[str, Any], output_dir: str) -> str:
    """What the build wrote: rows, tokens, layers, and the size of every file in ``output_dir`` (shards, head,
    manifest, checksums)."""
    settings = manifest["settings"]
    num_files, num_bytes = folder_contents(output_dir)
    return (
        f"distillens cache-teacher: {manifest['num_rows']} rows, {manifest['num_tokens']} response tokens, "
        f"{len(settings['layers'])} teacher layers ({settings['mode']}, {manifest['bytes_per_token_per_layer']} bytes "
        f"per token and layer), {num_bytes / 2**20:.1f} MiB in {num_files} files in {output_dir}; train with "
        f"--teacher_cache {output_dir}."
    )


@dataclass
class VerifyArguments:
    """What ``--verify`` reads of a command line (the other fields of a full cache-teacher command are ignored)."""

    output_dir: str | None = field(default=None, metadata={"help": "The cache folder to check."})
    verify: bool = field(default=False, metadata={"help": "Check the cache in --output_dir."})


def verify_requested(argv: Sequence[str]) -> VerifyArguments | None:
    """The ``--verify`` arguments when ``--verify`` is set (the rest of the command line may be a full build's)."""
    if "verify" not in given_fields(argv):
        return None
    parser = _Parser([VerifyArguments], prog="distillens cache-teacher")  # one-line errors
    verify_args, _ = parser.parse_args_into_dataclasses(
        args=expand_config_file(argv), return_remaining_strings=True
    )
    return verify_args if verify_args.verify else None


def verify_existing_cache(output_dir: str | None) -> int:
    """``--verify``: check every file of the cache in ``output_dir`` against its manifest; prints one summary line
    (exit 0) or one line per damaged file on stderr (exit 1). ValueError (one line) for a folder that holds no
    complete cache."""
    if not output_dir:
        raise ValueError("distillens cache-teacher --verify checks the cache in --output_dir: pass it.")
    folder = Path(output_dir)
    if not folder.is_dir():
        raise ValueError(f"--output_dir={output_dir!r} is not a folder: give the folder of a teacher cache.")
    manifest = read_manifest(folder)
    if manifest is None:
        raise ValueError(f"--output_dir={output_dir!r} holds no {MANIFEST_NAME}: it is not a teacher cache.")
    if not manifest.get("complete"):
        raise ValueError(
            f"the teacher cache {output_dir} is incomplete (its build was interrupted): rerun distillens "
            "cache-teacher with the same arguments to finish it (the shards written so far are checked and kept)."
        )
    start = time.perf_counter()
    damaged = cache_damage(folder, manifest)
    for damage in damaged:
        print(f"distillens cache-teacher: error: {damage_line(output_dir, damage)}", file=sys.stderr)
    if damaged:
        return 1
    print(
        f"distillens cache-teacher: {output_dir} is whole: {MANIFEST_NAME} and the "
        f"{len(recorded_files(manifest))} files it records ({recorded_bytes(manifest) / 2**20:.1f} MiB) match "
        f"their sha256 (checked in {time.perf_counter() - start:.1f} s)."
    )
    return 0


def main(argv: Sequence[str]) -> int:
    """``distillens cache-teacher [CONFIG] --teacher_model_name_or_path T --model_name_or_path S --train_file F
    --output_dir C --cache_mode hidden|topk ...``; ``distillens cache-teacher --verify --output_dir C``."""
    verify_args = verify_requested(argv)
    if verify_args is not None:
        return verify_existing_cache(verify_args.output_dir)
    model_args, data_args, training_args, cache_args = parse_command(
        CACHE_TEACHER_ARGUMENTS, argv, "distillens cache-teacher"
    )
    given = given_fields(argv)
    if "output_dir" not in given:
        raise ValueError("distillens cache-teacher writes the cache to --output_dir: pass it.")
    template = data_args.prompt_template if "prompt_template" in given else None
    models = [
        ("teacher", training_args.teacher_model_name_or_path),
        ("student", model_args.model_name_or_path),
    ]
    decided = decided_prompt_template(template, models)
    choose_prompt_format = None  # no flag, no record: chosen from the student's tokenizer once it has loaded
    if decided is not None:
        data_args.prompt_template = decided
    else:
        choose_prompt_format = partial(choose_prompt_template, None, models)
    with writing_into(
        training_args.output_dir,
        fix="free space there and rerun to finish the cache, or choose another --output_dir",
    ):
        manifest = build_teacher_cache(
            model_args,
            data_args,
            training_args,
            cache_args,
            overwrite_output_dir=cache_args.overwrite_output_dir,
            choose_prompt_format=choose_prompt_format,
        )
    if manifest is not None:
        print(summary_line(manifest, training_args.output_dir))
    return 0
