"""``distillens train``: load the student and the data, distil (or SFT), save the model, its prompt format and its
model card."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from transformers import TrainerCallback

from ..config import DistillLensConfig
from ..data.arguments import DataArguments
from ..data.building import build_datasets
from ..data.collation import DataCollatorForCompletionOnly
from ..files import (
    check_output_dir,
    missing_folders,
    overwrite_output_dir_field,
    remove_empty_folders,
    write_json_atomic,
    writing_into,
)
from ..loss.layer_map import LayerPair, resolve_student_layers
from ..models.facts import check_fits_context, config_num_layers
from ..models.info import (
    MODEL_INFO_NAME,
    RESOLVED_CONFIG_NAME,
    choose_prompt_template,
    decided_prompt_template,
    write_model_info,
)
from ..models.loading import LoraArguments, ModelArguments, load_student, load_student_tokenizer, read_config
from ..teacher.cache.adoption import adopt_cache_layer_map, adopt_cache_prompt_format
from ..teacher.frozen import read_teacher_config
from ..trainer.checkpoints import resolve_resume_from_checkpoint, resume_requested
from ..trainer.distillens_trainer import DistillLensTrainer
from .parsing import given_fields, parse_command
from .process import check_launched_world_size

logger = logging.getLogger(__name__)


@dataclass
class OutputArguments:
    """What ``distillens train`` may do to an existing ``output_dir`` (its other output settings are
    ``TrainingArguments``')."""

    overwrite_output_dir: bool = overwrite_output_dir_field("its files may be replaced")


# The pip package behind each report_to integration, where its name differs.
_INTEGRATION_PACKAGES = {"comet_ml": "comet-ml", "azure_ml": "azureml-core", "neptune": "neptune"}


def check_reporting_integrations(report_to: str | list[str] | None) -> None:
    """ValueError naming the package to install for every ``report_to`` integration that is not installed."""
    from transformers.integrations import get_available_reporting_integrations

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    available = set(get_available_reporting_integrations())
    for name in names:
        if name not in ("none", "all") and name not in available:
            package = _INTEGRATION_PACKAGES.get(name, name)
            raise ValueError(
                f"report_to={name!r} needs the {package} package, which is not installed: pip install {package}, "
                "or pass --report_to none."
            )


class RecordPromptFormat(TrainerCallback):
    """Write ``distillens.json`` (the prompt format) into every checkpoint, so a checkpoint is used like the
    final model."""

    def __init__(self, prompt_template: str) -> None:
        self.prompt_template = prompt_template

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            write_model_info(checkpoint, prompt_template=self.prompt_template)
        return control


class RecordRun(TrainerCallback):
    """Write the run record (``distillens_config.json``, atomically) once training begins: after the models, the
    data and any checkpoint have loaded, so a run that fails during setup leaves ``output_dir`` as it found it (and
    a finished run's record in place). ``started`` tells whether it has been reached."""

    def __init__(self, path: Path, record: dict) -> None:
        self.path, self.record, self.started = path, record, False

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = True
        if state.is_world_process_zero:
            write_json_atomic(self.path, self.record)
        return control


def output_summary(
    training_args: DistillLensConfig, prompt_template: str, output_dir_given: bool = True
) -> str:
    """The last line of ``distillens train``: where the model, the checkpoints and the metrics went."""
    output_dir = training_args.output_dir
    checkpoints = (
        f"checkpoints in {output_dir}/checkpoint-*"
        if training_args.save_strategy != "no"
        else "no checkpoints (save_strategy no)"
    )
    where = (
        "" if output_dir_given else f" (no --output_dir given: output went to {os.path.abspath(output_dir)})"
    )
    return (
        f"distillens train: model and tokenizer in {output_dir} (prompt format {prompt_template!r}, recorded in "
        f"{MODEL_INFO_NAME}), {checkpoints}, metrics in {output_dir}/all_results.json and "
        f"{output_dir}/trainer_state.json{where}."
    )


def resolved_config(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DistillLensConfig,
    data_stats: dict[str, int] | None = None,
    lora_args: LoraArguments | None = None,
) -> dict:
    model = asdict(model_args) | (asdict(lora_args) if lora_args is not None else {})
    config = {"model": model, "data": asdict(data_args), "training": training_args.to_dict()}
    if data_stats:
        config["data_stats"] = dict(data_stats)
    return config


def check_models_before_loading(
    model_args: ModelArguments, data_args: DataArguments, training_args: DistillLensConfig
) -> None:
    """Checks that need only the models' configs, run before any data or weights are loaded.

    The student must be deep enough for the lens layers, and ``--max_length`` (and, with sampled completions,
    ``--max_prompt_length + --max_new_tokens``) must fit both models' context (a longer example would end in an
    IndexError from the position embedding mid-training).
    """
    fix = "pass --max_length {limit} or less (and --max_prompt_length below it)"
    objective = training_args.objective_spec
    student = read_config(
        model_args.model_name_or_path, model_args.gguf_file, trust_remote_code=model_args.trust_remote_code
    )
    teacher = None
    if objective.needs_teacher:
        teacher = read_teacher_config(
            training_args.teacher_model_name_or_path,
            training_args.teacher_gguf_file,
            trust_remote_code=model_args.trust_remote_code,
        )
    if student is not None and objective.needs_teacher and objective.uses_hidden_states:
        resolve_student_layers(
            config_num_layers(student), training_args.lens_student_layers, training_args.lens_num_layers
        )
    for name, config in (("student", student), ("teacher", teacher)):
        check_fits_context(data_args.max_length, config, model=name, setting="--max_length", fix=fix)
    if training_args.generates_completions:  # a prompt and its sampled completion must fit as well
        generated = data_args.max_prompt_length + training_args.max_new_tokens
        for name, config in (("student", student), ("teacher", teacher)):
            check_fits_context(
                generated, config, model=name, setting="--max_prompt_length + --max_new_tokens",
                fix="lower --max_new_tokens or --max_prompt_length so that they add up to {limit} or less",
            )  # fmt: skip


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DistillLensConfig,
    callbacks: list | None = None,
    *,
    lora_args: LoraArguments | None = None,
    overwrite_output_dir: bool = False,
    choose_prompt_format: Callable[..., str] | None = None,
) -> DistillLensTrainer:
    """Distil (or SFT) a student as configured and save it with its tokenizer in ``output_dir``.

    Everything that can be checked is checked before training begins, and until then nothing is written: a run
    that fails during setup leaves ``output_dir`` as it found it (folders it created are removed again). A failed
    write into ``output_dir`` (full disk, read-only file system) is one line naming the folder.
    ``choose_prompt_format(tokenizer=...)``, when given, sets ``data_args.prompt_template`` once the student's
    tokenizer has loaded (:func:`~distillens_trainer.models.info.choose_prompt_template`'s rule).
    """
    output_dir = training_args.output_dir
    check_output_dir(
        output_dir,
        allowed=overwrite_output_dir or resume_requested(training_args.resume_from_checkpoint),
        how_to_allow="pass --overwrite_output_dir true to train into it, --resume_from_checkpoint to continue a run",
    )
    resume_from_checkpoint = resolve_resume_from_checkpoint(training_args.resume_from_checkpoint, output_dir)
    check_launched_world_size(training_args)
    check_models_before_loading(model_args, data_args, training_args)
    created = missing_folders(output_dir)
    record = RecordRun(Path(output_dir) / RESOLVED_CONFIG_NAME, {})
    try:
        with writing_into(
            output_dir,
            fix="free space there (or make it writable) and resume with --resume_from_checkpoint true, "
            "or choose another --output_dir",
        ):
            return _train_and_save(
                model_args,
                data_args,
                training_args,
                record,
                callbacks,
                lora_args,
                resume_from_checkpoint,
                choose_prompt_format,
            )
    except BaseException:
        if not record.started:
            remove_empty_folders(created)
        raise


def _train_and_save(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DistillLensConfig,
    record: RecordRun,
    callbacks: list | None,
    lora_args: LoraArguments | None,
    resume_from_checkpoint: str | None,
    choose_prompt_format: Callable[..., str] | None = None,
) -> DistillLensTrainer:
    """Load the data and the student, train (``record`` writes the run record as training begins), save."""
    tokenizer = load_student_tokenizer(model_args)
    if choose_prompt_format is not None:
        data_args.prompt_template = choose_prompt_format(tokenizer=tokenizer)
    data_stats: dict[str, int] = {}
    train_dataset, eval_dataset = build_datasets(
        data_args,
        tokenizer,
        main_process_first=partial(training_args.main_process_first, desc="tokenising the datasets"),
        stats=data_stats,
    )
    if train_dataset is None:
        raise ValueError("no training data: pass --train_file or --dataset_name.")
    student = load_student(model_args, lora_args)
    record.record = resolved_config(model_args, data_args, training_args, data_stats, lora_args)
    trainer = DistillLensTrainer(
        model=student,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForCompletionOnly(tokenizer),
        callbacks=[*(callbacks or []), RecordPromptFormat(data_args.prompt_template), record],
    )
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        write_model_info(training_args.output_dir, prompt_template=data_args.prompt_template)
    trainer.create_model_card(
        model_name=Path(training_args.output_dir).name,
        finetuned_from=model_args.model_name_or_path,
        dataset=data_args.train_file or data_args.dataset_name,
    )
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    return trainer


def cache_adoption_line(
    data_args: DataArguments, teacher_cache: str, layer_map: list[LayerPair] | None
) -> str:
    """The one line ``train --teacher_cache`` prints about what it took from the cache."""
    layers = (
        f"; the layer map {layer_map} it was made for (a --lens_layer_map, --lens_num_layers or "
        "--lens_student_layers flag chooses another that it holds)"
        if layer_map is not None
        else ""
    )
    return (
        f"distillens train: as the teacher cache {teacher_cache} was made: prompt format "
        f"{data_args.prompt_template!r}, max_length {data_args.max_length}, max_prompt_length "
        f"{data_args.max_prompt_length}{layers}."
    )


# What `distillens train` parses its command line (and config file) into, in this order.
TRAIN_ARGUMENTS = (ModelArguments, LoraArguments, DataArguments, DistillLensConfig, OutputArguments)


def main(argv: Sequence[str]) -> int:
    """``distillens train [CONFIG] --field value ...``."""
    model_args, lora_args, data_args, training_args, output_args = parse_command(
        TRAIN_ARGUMENTS, argv, "distillens train"
    )
    given = given_fields(argv)
    check_reporting_integrations(training_args.report_to)
    choose_prompt_format = None  # with a cache, its prompt format is the run's
    if training_args.teacher_cache:
        adopt_cache_prompt_format(data_args, training_args.teacher_cache, given)
        layer_map = adopt_cache_layer_map(model_args, training_args, training_args.teacher_cache, given)
        if training_args.process_index == 0:
            print(cache_adoption_line(data_args, training_args.teacher_cache, layer_map))
    else:
        teacher = (
            training_args.teacher_model_name_or_path if training_args.objective_spec.needs_teacher else None
        )
        template = data_args.prompt_template if "prompt_template" in given else None
        models = [("teacher", teacher), ("student", model_args.model_name_or_path)]
        decided = decided_prompt_template(template, models)
        if decided is not None:
            data_args.prompt_template = decided
        else:  # no flag, no record: chosen from the student's tokenizer once it has loaded
            choose_prompt_format = partial(choose_prompt_template, None, models)
    run_training(
        model_args,
        data_args,
        training_args,
        lora_args=lora_args,
        overwrite_output_dir=output_args.overwrite_output_dir,
        choose_prompt_format=choose_prompt_format,
    )
    summary = output_summary(training_args, data_args.prompt_template, output_dir_given="output_dir" in given)
    if training_args.process_index == 0:  # one line for the run, not one per rank
        print(summary)
    return 0
