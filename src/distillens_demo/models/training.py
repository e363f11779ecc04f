"""The demo's small Llama-style models and their training with :class:`~distillens_trainer.DistillLensTrainer`,
from the teacher model or, for the cache methods, from a teacher cache built once in the demo's cache folder;
:class:`TrainingRun` is what a training run reports."""

from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, TrainerCallback, set_seed

from distillens_trainer.config import DistillLensConfig
from distillens_trainer.data.collation import DataCollatorForCompletionOnly
from distillens_trainer.loss.layer_map import LayerMapFields, paper_student_layers, resolve_run_layer_map
from distillens_trainer.models.facts import num_hidden_layers
from distillens_trainer.models.shrink import recorded_kept_layers
from distillens_trainer.progress import PROGRESS_EVERY_S, ProgressLines, is_terminal
from distillens_trainer.teacher.cache.format import read_manifest
from distillens_trainer.teacher.cache.writer import teacher_cache_settings, write_teacher_cache
from distillens_trainer.teacher.frozen import shared_vocab_size
from distillens_trainer.trainer.distillens_trainer import DistillLensTrainer

from ..arguments import HEAD_DIM, METHODS, DemoArguments
from .store import suite_key, teacher_cache_path, teacher_signals_key, teacher_signals_path
from .training_data import Suite

logger = logging.getLogger(__name__)

# Building a cache method's teacher cache: rows per teacher forward, rows per shard file.
TEACHER_CACHE_BATCH_SIZE = 64
TEACHER_CACHE_ROWS_PER_SHARD = 2048


@dataclass(frozen=True)
class TrainingRun:
    """What one training run of :func:`train_model` reports (the model itself is trained in place).

    ``objective`` holds the run's loss fields (weights, divergences, ``lens_num_layers``), ``layer_map`` its
    (student, teacher) lens pairs, ``log_history`` the Trainer's logs, and ``final_*`` the mean of the last
    three logged values of each term (None when it was not logged).
    """

    train_time_s: float
    max_steps: int
    objective: dict[str, Any]
    layer_map: list[list[int]]
    log_history: list[dict[str, Any]]
    final_loss: float | None = None
    final_ce_loss: float | None = None
    final_kd_loss: float | None = None
    final_lens_loss: float | None = None
    final_feature_loss: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Every field, as JSON-ready values (what a cache entry's info records)."""
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """Every field but the log history (what ``results.json`` records per model)."""
        return {key: value for key, value in self.as_dict().items() if key != "log_history"}


def model_config(tokenizer: Any, num_layers: int, hidden_size: int):
    """A small Llama-style config (SwiGLU, RoPE, RMSNorm, tied embeddings) over the suite tokenizer."""
    heads = hidden_size // HEAD_DIM
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=(8 * hidden_size // 3 + 15) // 16 * 16,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(tokenizer: Any, num_layers: int, hidden_size: int, seed: int):
    """A randomly initialised fp32 causal LM, deterministic given ``seed``."""
    set_seed(seed)
    model = LlamaForCausalLM(model_config(tokenizer, num_layers, hidden_size))
    return model.to(torch.float32)


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(parameter.numel() for parameter in {id(p): p for p in model.parameters()}.values())


def _final_logged(log_history: Sequence[Mapping[str, Any]], key: str, last: int = 3) -> float | None:
    """Mean of the last ``last`` logged values of ``key`` (training logs only)."""
    values = [entry[key] for entry in log_history if key in entry and "train_runtime" not in entry]
    return round(statistics.fmean(values[-last:]), 5) if values else None


def on_policy_means(log_history: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """A run's share of on-policy windows and mean sampled completion length (tokens, EOS included), from the
    trainer's ``on_policy_fraction`` and ``completion_length`` logs, each a mean since the previous training log:
    the share weighted by the optimizer steps a log covers, the length by the on-policy windows among them (one
    completion per row, the same rows per window). None for a run that logged neither (off-policy)."""
    steps_total = on_policy_total = length_total = 0.0
    previous = 0
    for entry in log_history:
        if "loss" not in entry or "step" not in entry:  # the final summary or an evaluation
            continue
        steps, previous = entry["step"] - previous, entry["step"]
        if "on_policy_fraction" not in entry:
            continue
        on_policy = steps * entry["on_policy_fraction"]
        steps_total += steps
        on_policy_total += on_policy
        if "completion_length" in entry:
            length_total += on_policy * entry["completion_length"]
    return {
        "on_policy_fraction": round(on_policy_total / steps_total, 5) if steps_total else None,
        "completion_length": round(length_total / on_policy_total, 3) if on_policy_total else None,
    }


def train_model(
    model: torch.nn.Module,
    suite: Suite,
    *,
    objective: Mapping[str, Any],
    output_dir: Path,
    max_steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    logging_steps: int,
    lens_num_layers: int = 1,
    lens_teacher_layers: Sequence[int] | None = None,
    teacher: torch.nn.Module | None = None,
    description: str = "",
    config_overrides: Mapping[str, Any] | None = None,
) -> TrainingRun:
    """Train ``model`` in place with :class:`DistillLensTrainer` and return its log and final losses.

    ``config_overrides`` are further :class:`DistillLensConfig` fields (e.g. ``bf16``, ``lens_layer_map``).
    """
    config = DistillLensConfig(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, max_steps // 20),
        weight_decay=0.0,
        logging_steps=logging_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        seed=seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not is_terminal(),
        lens_num_layers=lens_num_layers,
        **explicit_lens_layers(model, lens_num_layers, lens_teacher_layers),
        **objective,
        **(config_overrides or {}),
    )
    needs_teacher = config.objective_spec.needs_teacher
    trainer = DistillLensTrainer(
        model=model,
        args=config,
        train_dataset=suite.train_dataset,
        processing_class=suite.tokenizer,
        data_collator=DataCollatorForCompletionOnly(suite.tokenizer),
        teacher_model=teacher if needs_teacher else None,
    )
    if config.disable_tqdm:  # not a terminal: a line every ~30 s instead of a bar or a dict per log step
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(TrainingProgress(description or "training"))
    if description:
        logger.info("[demo] training %s: %s, %d steps", description, dict(objective), max_steps)
    start = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - start
    history = [dict(entry) for entry in trainer.state.log_history]
    model.eval()
    return TrainingRun(
        train_time_s=round(train_time, 2),
        max_steps=max_steps,
        objective={
            key: getattr(config, key)
            for key in (*_OBJECTIVE_FIELDS, *(_GENERATION_FIELDS if config.generates_completions else ()))
        },
        layer_map=[list(pair) for pair in trainer.layer_map],
        log_history=history,
        final_loss=_final_logged(history, "loss"),
        final_ce_loss=_final_logged(history, "ce_loss"),
        final_kd_loss=_final_logged(history, "kd_loss"),
        final_lens_loss=_final_logged(history, "lens_loss"),
        final_feature_loss=_final_logged(history, "feature_loss"),
    )


class TrainingProgress(TrainerCallback):
    """Progress lines of a run for logs that are not a terminal (:class:`~distillens_trainer.progress.ProgressLines`
    through the demo's log): at most one every ``every_s`` seconds with the step, the time left and the last logged
    loss, and one when the run ends."""

    def __init__(self, description: str, *, every_s: float = PROGRESS_EVERY_S, clock=time.monotonic) -> None:
        self.description = description
        self.every_s = every_s
        self.clock = clock
        self.lines: ProgressLines | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.lines = ProgressLines(
            state.max_steps,
            f"[demo] {self.description}",
            every_s=self.every_s,
            emit=logger.info,
            clock=self.clock,
        )
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.lines is not None and logs and "loss" in logs:
            self.lines.set_postfix_str(f"loss {float(logs['loss']):.4f}")
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if (
            self.lines is not None and state.global_step < state.max_steps
        ):  # the last: at the end, with its loss
            self.lines.update(state.global_step - self.lines.done)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.lines is not None:
            self.lines.update(state.global_step - self.lines.done)
            self.lines.close()
        return control


def explicit_lens_layers(
    model: torch.nn.Module, lens_num_layers: int, lens_teacher_layers: Sequence[int] | None
) -> dict[str, list[int]]:
    """DistillLensConfig's explicit layer fields when the teacher layers are given, else nothing."""
    if lens_teacher_layers is None:
        return {}
    student_layers = paper_student_layers(model.config.num_hidden_layers, lens_num_layers)
    return {"lens_student_layers": student_layers, "lens_teacher_layers": list(lens_teacher_layers)}


_OBJECTIVE_FIELDS = (
    "ce_weight", "kd_weight", "kd_divergence", "lens_weight", "lens_divergence", "feature_weight",
    "lens_num_layers", "lmbda",
)  # fmt: skip
_GENERATION_FIELDS = ("max_new_tokens",)  # recorded too when the run samples completions


def method_objective(method: str, args: DemoArguments, suite: Suite | None = None) -> dict[str, Any]:
    """The DistillLensConfig fields of a student method: its loss and, for an on-policy method (``lmbda > 0``),
    the length of its sampled completions, :attr:`Suite.completion_max_new_tokens` of ``suite`` (needed then)."""
    objective = dict(METHODS[method])
    objective.pop("teacher_cache", None)  # the cache's settings, not a config field: see train_student
    if objective.get("kd_weight", 0) > 0:
        objective.setdefault("kd_divergence", args.kd_divergence)
    if method.startswith("distillens"):
        objective["lens_weight"] = args.lens_weight
    if objective.get("lmbda", 0) > 0:
        if suite is None:
            raise ValueError(f"method {method!r} samples completions: pass the suite to size them.")
        objective["max_new_tokens"] = suite.completion_max_new_tokens
    return objective


def train_student(
    method: str,
    initial_student: torch.nn.Module,
    teacher: torch.nn.Module,
    suite: Suite,
    args: DemoArguments,
    output_dir: Path,
    seed: int | None = None,
) -> tuple[torch.nn.Module, TrainingRun]:
    """A copy of ``initial_student`` trained with ``method``; returns ``(student, its run)``.

    A cache method (a ``teacher_cache`` entry in :data:`METHODS`) trains from the teacher cache
    :func:`get_teacher_signals` gives, without the teacher model; its run's objective records the cache.
    """
    student = copy.deepcopy(initial_student)
    cache = METHODS[method].get("teacher_cache")
    overrides = None
    if cache is not None:
        cache_path = get_teacher_signals(cache, teacher, student, suite, args)
        overrides = {"teacher_cache": str(cache_path)}
        teacher = None  # the trainer refuses a teacher model beside a cache
    run = train_model(
        student,
        suite,
        objective=method_objective(method, args, suite),
        output_dir=output_dir,
        max_steps=args.student_max_steps,
        learning_rate=args.student_learning_rate,
        batch_size=args.batch_size,
        seed=args.seed if seed is None else seed,
        logging_steps=args.logging_steps,
        lens_num_layers=args.lens_num_layers,
        lens_teacher_layers=args.lens_teacher_layers,
        teacher=teacher,
        description=f"student '{method}'",
        config_overrides=overrides,
    )
    if cache is not None:
        run = dataclasses.replace(
            run, objective={**run.objective, "teacher_cache": {**cache, "path": overrides["teacher_cache"]}}
        )
    return student, run


def lens_layer_map(
    student: torch.nn.Module, teacher: torch.nn.Module, args: DemoArguments
) -> list[list[int]]:
    """The (student, teacher) lens pairs the trainer resolves for ``student`` and ``teacher`` under ``args`` (the
    teacher layers a teacher cache must hold)."""
    fields = explicit_lens_layers(student, args.lens_num_layers, args.lens_teacher_layers)
    pairs = resolve_run_layer_map(
        num_hidden_layers(student),
        num_hidden_layers(teacher),
        LayerMapFields.of({"lens_num_layers": args.lens_num_layers, **fields}),
        recorded_kept_layers(student.config),
    )
    return [list(pair) for pair in pairs]


def teacher_cache_rows(suite: Suite) -> list[Any]:
    """The tokenised rows a cache method's trainer must find in its teacher cache: the training split (train_model
    passes the trainer no eval_dataset; the lens profile runs the teacher model itself)."""
    return [suite.train_dataset]


def get_teacher_signals(
    cache: Mapping[str, Any],
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    suite: Suite,
    args: DemoArguments,
) -> Path:
    """The teacher cache of ``teacher`` with the settings ``cache`` (a method's ``teacher_cache`` entry: ``mode``,
    ``dtype``, ``top_k``), over :func:`teacher_cache_rows`, for ``student``'s lens layer map and shared vocabulary:
    reused from ``<cache_dir>/teacher-signals-<hash>`` when complete with these settings, else built (an interrupted
    build is finished) there. Returns its folder."""
    layer_map = lens_layer_map(student, teacher, args)
    vocab_size = shared_vocab_size(student, teacher, suite.tokenizer)
    path = teacher_signals_path(args, teacher_signals_key(args, cache, layer_map, vocab_size))
    settings = teacher_cache_settings(
        teacher,
        layer_map=[tuple(pair) for pair in layer_map],
        vocab_size=vocab_size,
        tokenizer=suite.tokenizer,
        teacher_name=f"distillens demo {teacher_cache_path(args).name}",
        data=suite_key(args),
        **cache,
    )
    manifest = read_manifest(path)
    if manifest is not None and manifest.get("complete") and manifest.get("settings") == settings.to_json():
        logger.info("[demo] reusing the teacher cache %s", path)
        return path
    logger.info("[demo] building the %s teacher cache %s (%s)", cache["mode"], path, dict(cache))
    start = time.perf_counter()
    finished = write_teacher_cache(
        teacher,
        teacher_cache_rows(suite),
        settings,
        path,
        pad_token_id=suite.tokenizer.pad_token_id,
        batch_size=TEACHER_CACHE_BATCH_SIZE,
        rows_per_shard=TEACHER_CACHE_ROWS_PER_SHARD,
        overwrite=True,  # a folder of this key made with other settings (e.g. a retrained teacher) is replaced
        show_progress=False,
    )
    logger.info(
        "[demo] built the teacher cache %s in %.1f s: %d rows, %d response tokens, %.1f MB",
        path,
        time.perf_counter() - start,
        finished["num_rows"],
        finished["num_tokens"],
        sum(shard["bytes"] for shard in finished["shards"]) / 1e6,
    )
    return path
