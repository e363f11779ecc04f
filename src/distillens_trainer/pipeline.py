"""The training workflow behind ``distillens train``: load models and data, distil, save."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, TrainerCallback

from .config import DistillLensConfig
from .data import DataArguments, DataCollatorForCompletionOnly, build_datasets
from .distributed import check_launched_world_size
from .files import check_output_dir, write_json_atomic
from .layer_map import resolve_student_layers
from .limits import check_fits_context
from .model_info import MODEL_INFO_NAME, write_model_info
from .modeling import DTYPE_NAMES, check_dtype_name, config_num_layers, torch_dtype
from .models import load_causal_lm, load_tokenizer_from, read_config
from .trainer import DistillLensTrainer

logger = logging.getLogger(__name__)

RESOLVED_CONFIG_NAME = "distillens_config.json"


@dataclass
class ModelArguments:
    """The student (and how to load it); the teacher is part of :class:`DistillLensConfig`."""

    model_name_or_path: str = field(metadata={"help": "Student model: a local folder or a hub id."})
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "Load the student from this GGUF file inside model_name_or_path (de-quantised; the "
            "tokenizer too unless tokenizer_name_or_path is given). Needs the gguf extra."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or hub id; defaults to model_name_or_path."}
    )
    model_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype the student is loaded in (auto = the checkpoint's).",
            "choices": list(DTYPE_NAMES),
        },
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel, e.g. sdpa, eager, flash_attention_2."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the hub."}
    )
    use_peft: bool = field(
        default=False, metadata={"help": "Train a LoRA adapter instead of the whole student."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: PEFT's choice for the architecture)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow training into a non-empty output_dir (its files may be replaced)."},
    )

    def __post_init__(self) -> None:
        check_dtype_name("model_dtype", self.model_dtype)
        if self.use_peft and self.lora_r < 1:
            raise ValueError(f"lora_r={self.lora_r} must be >= 1.")


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


def turn_off_pin_memory_without_accelerator(training_args: DistillLensConfig) -> None:
    """Pinned memory only helps copies to an accelerator: off when training on the CPU (torch warns otherwise)."""
    if training_args.dataloader_pin_memory and training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False


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
) -> dict:
    config = {"model": asdict(model_args), "data": asdict(data_args), "training": training_args.to_dict()}
    if data_stats:
        config["data_stats"] = dict(data_stats)
    return config


def check_models_before_loading(
    model_args: ModelArguments, data_args: DataArguments, training_args: DistillLensConfig
) -> None:
    """Checks that need only the models' configs, run before any data or weights are loaded.

    The student must be deep enough for the lens layers, and ``--max_length`` must fit both models' context
    (a longer example would end in an IndexError from the position embedding mid-training).
    """
    fix = "pass --max_length {limit} or less (and --max_prompt_length below it)"
    objective = training_args.objective
    student = read_config(
        model_args.model_name_or_path, model_args.gguf_file, trust_remote_code=model_args.trust_remote_code
    )
    teacher = None
    if objective.needs_teacher:
        teacher = read_config(
            training_args.teacher_model_name_or_path,
            training_args.teacher_gguf_file,
            gguf_field="teacher_gguf_file",
            trust_remote_code=model_args.trust_remote_code,
        )
    if student is not None and objective.needs_teacher and objective.uses_hidden_states:
        resolve_student_layers(
            config_num_layers(student), training_args.lens_student_layers, training_args.lens_num_layers
        )
    for name, config in (("student", student), ("teacher", teacher)):
        check_fits_context(data_args.max_length, config, model=name, setting="--max_length", fix=fix)


def load_student(model_args: ModelArguments) -> PreTrainedModel:
    """The student causal LM, optionally wrapped with a LoRA adapter."""
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(model_args.model_dtype),
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    model = load_causal_lm(model_args.model_name_or_path, gguf_file=model_args.gguf_file, **kwargs)
    if model_args.use_peft:
        try:
            import peft
        except ImportError as error:
            raise ValueError(
                "use_peft needs the peft package: pip install 'distillens-trainer[peft]'."
            ) from error
        lora = peft.LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, lora)
    return model


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, gguf_file: str | None = None):
    try:
        tokenizer = load_tokenizer_from(name_or_path, gguf_file, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ValueError(
            f"no tokenizer could be loaded from {name_or_path!r}: pass --tokenizer_name_or_path."
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DistillLensConfig,
    callbacks: list | None = None,
) -> DistillLensTrainer:
    """Distil (or SFT) a student as configured and save it with its tokenizer in ``output_dir``."""
    check_output_dir(
        training_args.output_dir,
        allowed=model_args.overwrite_output_dir or bool(training_args.resume_from_checkpoint),
        how_to_allow="pass --overwrite_output_dir true to train into it, --resume_from_checkpoint to continue a run",
    )
    check_launched_world_size(training_args)
    check_models_before_loading(model_args, data_args, training_args)
    tokenizer = load_tokenizer(
        model_args.tokenizer_name_or_path or model_args.model_name_or_path,
        model_args.trust_remote_code,
        gguf_file=None if model_args.tokenizer_name_or_path else model_args.gguf_file,
    )
    data_stats: dict[str, int] = {}
    train_dataset, eval_dataset = build_datasets(
        data_args,
        tokenizer,
        main_process_first=partial(training_args.main_process_first, desc="tokenising the datasets"),
        stats=data_stats,
    )
    if train_dataset is None:
        raise ValueError("no training data: pass --train_file or --dataset_name.")
    student = load_student(model_args)
    trainer = DistillLensTrainer(
        model=student,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForCompletionOnly(tokenizer),
        callbacks=[*(callbacks or []), RecordPromptFormat(data_args.prompt_template)],
    )
    if trainer.is_world_process_zero():
        write_json_atomic(
            Path(training_args.output_dir) / RESOLVED_CONFIG_NAME,
            resolved_config(model_args, data_args, training_args, data_stats),
        )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        write_model_info(training_args.output_dir, prompt_template=data_args.prompt_template)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    return trainer
