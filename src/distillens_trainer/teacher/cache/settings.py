"""What identifies the cache a ``distillens cache-teacher`` run builds: its own fields (:class:`CacheArguments`),
and the layer map and vocabulary ``distillens train`` would resolve for the same student, teacher and data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn

from ...config import DistillLensConfig
from ...data.arguments import DataArguments, PromptFormatArguments
from ...files import overwrite_output_dir_field
from ...loss.layer_map import LayerMapFields, LayerPair, resolve_run_layer_map
from ...models.facts import config_num_layers, model_vocab_size, num_hidden_layers, text_config
from ...models.loading import ModelArguments
from ...models.shrink import recorded_kept_layers
from ..frozen import shared_vocab_size_of_rows
from .format import CACHE_DTYPES, CACHE_MODES, CacheSettings, config_fingerprint
from .writer import teacher_cache_settings


@dataclass
class CacheArguments:
    """What the cache keeps of the teacher (the teacher itself, the data and the layer map are the ``train``
    fields)."""

    cache_mode: str = field(
        default="hidden",
        metadata={
            "help": "hidden: the teacher's LM-head inputs at every mapped layer and the output, plus its head "
            "(exact, d values per token and layer); topk: the top_k token ids and log-probabilities and the "
            "tail mass (no teacher weights needed to train; divergences over top_k + 1 buckets).",
            "choices": list(CACHE_MODES),
        },
    )
    top_k: int = field(default=32, metadata={"help": "Tokens kept per position and layer in topk mode."})
    cache_dtype: str = field(
        default="bfloat16",
        metadata={
            "help": "Stored float dtype (head inputs or log-probabilities).",
            "choices": list(CACHE_DTYPES),
        },
    )
    rows_per_shard: int = field(
        default=256,
        metadata={"help": "Examples per shard file (the unit of resuming and of work per process)."},
    )
    overwrite_output_dir: bool = overwrite_output_dir_field(
        "the cache there is built afresh, whatever its settings (only the cache's own files are removed); "
        "without it a rerun with the same settings keeps the files that match their sha256 and rebuilds the others"
    )
    verify: bool = field(
        default=False,
        metadata={
            "help": "Only check the cache in --output_dir against its manifest (every file's size and sha256; "
            "nothing is loaded or written): one summary line and exit 0 when whole, else one line per damaged "
            "file and exit 1."
        },
    )

    def __post_init__(self) -> None:
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(
                f"--cache_mode must be one of {', '.join(CACHE_MODES)}; got {self.cache_mode!r}."
            )
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(
                f"--cache_dtype must be one of {', '.join(CACHE_DTYPES)}; got {self.cache_dtype!r}."
            )
        if self.top_k < 1:
            raise ValueError(f"--top_k={self.top_k} must be >= 1.")
        if self.rows_per_shard < 1:
            raise ValueError(f"--rows_per_shard={self.rows_per_shard} must be >= 1.")


def cached_layer_map(
    student_config: Any, teacher_num_layers: int, training_args: DistillLensConfig
) -> list[LayerPair]:
    """The layer map ``train`` would resolve for this student (its config) and teacher (empty when the objective
    reads no hidden states: no lens, no feature term)."""
    if not training_args.objective_spec.uses_hidden_states:
        return []
    return resolve_run_layer_map(
        config_num_layers(student_config),
        teacher_num_layers,
        LayerMapFields.of(training_args),
        recorded_kept_layers(student_config),
    )


def cache_settings(
    teacher: nn.Module,
    tokenizer: Any,
    teacher_tokenizer: Any,
    student_config: Any,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DistillLensConfig,
    cache_args: CacheArguments,
) -> CacheSettings:
    """What identifies the cache these arguments build: the layer map and vocabulary ``train`` would use."""
    vocab_size = shared_vocab_size_of_rows(
        int(text_config(student_config).vocab_size), model_vocab_size(teacher), tokenizer, teacher_tokenizer
    )
    format_fields = {item.name for item in fields(PromptFormatArguments)}
    data = {key: value for key, value in asdict(data_args).items() if key != "preprocessing_num_workers"}
    return teacher_cache_settings(
        teacher,
        mode=cache_args.cache_mode,
        layer_map=cached_layer_map(student_config, num_hidden_layers(teacher), training_args),
        vocab_size=vocab_size,
        dtype=cache_args.cache_dtype,
        top_k=cache_args.top_k,
        temperature=training_args.temperature,
        lens_final_norm=training_args.lens_final_norm,
        tokenizer=tokenizer,
        teacher_name=training_args.teacher_model_name_or_path,
        teacher_gguf_file=training_args.teacher_gguf_file,
        config_sha256=config_fingerprint(teacher.config),
        prompt_format={key: value for key, value in data.items() if key in format_fields},
        data=data,
        student={
            "name_or_path": model_args.model_name_or_path,
            "num_layers": config_num_layers(student_config),
        },
    )
