"""Settings of ``distillens lens``: what it profiles against the student, on which data, and where the results
go (:class:`LensArguments`; the student is :class:`~distillens_trainer.models.loading.ModelArguments`, the prompt
format :class:`~distillens_trainer.data.arguments.PromptFormatArguments`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..data.arguments import DataArguments, PromptFormatArguments
from ..files import overwrite_output_dir_field
from ..loss.divergences import DIVERGENCE_NAMES, PAPER_LENS_DIVERGENCE, check_divergence_name
from ..loss.layer_map import LAYER_MAPS, check_layer_map_choice
from ..loss.spec import check_temperature_and_beta
from .layer_blocks import DEFAULT_MEMORY_BUDGET_MIB

# --torch_compile: its choices and what each means for the profile (None: where it pays off).
COMPILE_CHOICES: dict[str, bool | None] = {"auto": None, "true": True, "false": False}


@dataclass
class LensArguments:
    """What ``distillens lens`` profiles against the student (:class:`~distillens_trainer.models.loading.ModelArguments`),
    on which data (read with :class:`~distillens_trainer.data.arguments.PromptFormatArguments`), and where the
    results go."""

    data_file: str = field(
        metadata={
            "help": "Data: a .json/.jsonl/.csv/.parquet file or a save_to_disk folder, as for training."
        }
    )
    output_dir: str = field(metadata={"help": "Where lens.json and the PNG figures are written."})
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher model (folder or hub id); without it the student is profiled alone."},
    )
    teacher_gguf_file: str | None = field(
        default=None,
        metadata={"help": "The teacher's GGUF file inside teacher_model_name_or_path (de-quantised)."},
    )
    max_samples: int = field(default=256, metadata={"help": "Use the first N rows of the data file."})
    max_tokens: int = field(
        default=8192, metadata={"help": "Use at most this many response tokens (the first ones, in order)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Rows per forward pass."})
    token_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens whose per-layer log-probabilities ([layers, tokens, vocab]) are held at once "
            "(default: as many as --lens_memory_mib holds)."
        },
    )
    lens_memory_mib: float = field(
        default=DEFAULT_MEMORY_BUDGET_MIB,
        metadata={
            "help": "Memory (MiB) of the reused per-chunk blocks (fp32 log-probabilities and probabilities of "
            "every layer of both models); sets the chunk size unless --token_chunk_size is given."
        },
    )
    divergences: list[str] = field(
        default_factory=lambda: [PAPER_LENS_DIVERGENCE],
        metadata={
            "help": "Divergences for the heatmap and curves (first = the curves'); "
            f"{', '.join(DIVERGENCE_NAMES)} as in training, student layer first.",
            "choices": list(DIVERGENCE_NAMES),
        },
    )
    jsd_beta: float = field(default=0.5, metadata={"help": "β of the generalised JSD, as in training."})
    lens_final_norm: bool = field(
        default=True,
        metadata={"help": "Apply the final norm before the LM head in the lens, as in training."},
    )
    lens_layer_map: str | None = field(
        default=None,
        metadata={
            "help": "The training's automatic layer map, marked in the figures: paper = the same relative depth; "
            "shrunk = the teacher block each student block was cut from (students written by 'distillens "
            "shrink'). Default: what the student's distillens_config.json says it was trained with, else paper.",
            "choices": list(LAYER_MAPS),
        },
    )
    lens_num_layers: int | None = field(
        default=None,
        metadata={
            "help": "Layer pairs of the automatic map, marked in the figures (default: as recorded with the "
            "student, else as in training: the paper's 5, fewer for a shallow student)."
        },
    )
    lens_student_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Explicit student layers of the training's layer map (hidden_states)."},
    )
    lens_teacher_layers: list[int] | None = field(
        default=None, metadata={"help": "Explicit teacher layers, one per student layer."}
    )
    torch_compile: str = field(
        default="auto",
        metadata={
            "help": "Run the JSD's pass over the vocabulary (one per layer pair and token, most of the work) through "
            "torch.compile: one fused pass instead of four, the same values up to fp32 rounding; eager where "
            "compiling fails (said once). auto: where it pays for its 10 s or so of compiling (tokens × layer "
            "pairs × vocabulary ≥ 3e10, e.g. 3,000 tokens of the SmolLM2 pair).",
            "choices": list(COMPILE_CHOICES),
        },
    )
    device: str | None = field(
        default=None, metadata={"help": "Device, e.g. cuda:0 or cpu (default: cuda if any)."}
    )
    overwrite_output_dir: bool = overwrite_output_dir_field("its lens files are replaced")

    def __post_init__(self) -> None:
        for name in ("max_samples", "max_tokens", "batch_size", "token_chunk_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be at least 1.")
        if self.torch_compile not in COMPILE_CHOICES:
            raise ValueError(
                f"torch_compile={self.torch_compile!r} is not one of {', '.join(COMPILE_CHOICES)}: e.g. "
                "--torch_compile auto."
            )
        if not self.lens_memory_mib > 0:
            raise ValueError(f"lens_memory_mib={self.lens_memory_mib} must be > 0 (e.g. 1024).")
        if self.lens_layer_map is not None:  # None: what the student's record says
            check_layer_map_choice(self.lens_layer_map, self.lens_teacher_layers)
        if not self.divergences:
            raise ValueError(
                f"divergences is empty: give at least one, e.g. --divergences {PAPER_LENS_DIVERGENCE}."
            )
        for name in self.divergences:
            check_divergence_name(name, "divergences")
        check_temperature_and_beta(1.0, self.jsd_beta)
        if self.teacher_model_name_or_path is None and (
            self.lens_student_layers or self.lens_teacher_layers or self.lens_layer_map
        ):
            raise ValueError(
                "lens_layer_map/lens_student_layers/lens_teacher_layers need --teacher_model_name_or_path."
            )
        if self.teacher_model_name_or_path is None and self.teacher_gguf_file:
            raise ValueError(
                "teacher_gguf_file needs --teacher_model_name_or_path (the folder that holds it)."
            )

    def data_arguments(self, prompt_format: PromptFormatArguments) -> DataArguments:
        """The ``distillens train`` data settings that read ``data_file`` the same way."""
        return DataArguments(
            train_file=self.data_file, max_train_samples=self.max_samples, **dataclasses.asdict(prompt_format)
        )

    def compile(self) -> bool | None:
        """``torch_compile`` as :func:`~distillens_trainer.diagnostics.report.profile_models` takes it (None: auto)."""
        return COMPILE_CHOICES[self.torch_compile]

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
