"""Settings of a ``distillens eval`` run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..data.arguments import PROMPT_TEMPLATES
from .generation import GenerationSettings, require

PAPER_SEEDS = (10, 20, 30, 40, 50)


@dataclass
class EvalArguments:
    """Settings of a generation-quality evaluation run, parseable with `transformers.HfArgumentParser`.

    The defaults are the paper's protocol (MiniLLM): sampling at temperature 1.0 with top-p 1.0,
    top-k 0 (disabled), no-repeat-ngram 6, five seeds, 256 new tokens, 256-token prompts.

    The model to evaluate and how it is loaded (model_name_or_path, gguf_file, tokenizer_name_or_path, dtype,
    attn_implementation, trust_remote_code) are :class:`distillens_trainer.loading.ModelArguments`, which
    ``distillens eval`` parses alongside.
    """

    output_dir: str = field(metadata={"help": "Directory for report.json and <name>.generations.jsonl."})
    eval_files: list[str] = field(
        metadata={"help": "One or more JSONL files with `instruction`, optional `input`, `output`/`outputs`."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate only the first N examples of each file (default: all)."}
    )
    seeds: list[int] = field(
        default_factory=lambda: list(PAPER_SEEDS),
        metadata={
            "help": "Sampling seeds; scores are averaged over them. Greedy decoding uses the first only."
        },
    )
    do_sample: bool = field(
        default=GenerationSettings.do_sample,
        metadata={"help": "Sample (paper protocol); pass --no_do_sample for greedy decoding."},
    )
    temperature: float = field(
        default=GenerationSettings.temperature, metadata={"help": "Sampling temperature (> 0)."}
    )
    top_p: float = field(
        default=GenerationSettings.top_p,
        metadata={"help": "Nucleus sampling mass in (0, 1]; 1.0 disables it."},
    )
    top_k: int = field(
        default=GenerationSettings.top_k, metadata={"help": "Top-k sampling (>= 0); 0 disables it."}
    )
    no_repeat_ngram_size: int = field(
        default=GenerationSettings.no_repeat_ngram_size,
        metadata={"help": "Forbid repeating n-grams of this size (>= 0); 0 disables it."},
    )
    max_new_tokens: int = field(
        default=GenerationSettings.max_new_tokens, metadata={"help": "Maximum number of generated tokens."}
    )
    max_prompt_length: int = field(
        default=GenerationSettings.max_prompt_length,
        metadata={"help": "Prompts longer than this many tokens keep only their last tokens."},
    )
    batch_size: int = field(
        default=GenerationSettings.batch_size, metadata={"help": "Prompts per generate() call."}
    )
    prompt_template: str = field(
        default="alpaca",
        metadata={
            "help": "Prompt format: alpaca (paper), chat (tokenizer template) or plain. On the command line the "
            "default is the format recorded with the model (distillens.json), else alpaca.",
            "choices": list(PROMPT_TEMPLATES),
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an existing report.json in output_dir."}
    )

    def __post_init__(self) -> None:
        """Validate every field; each error names the field and how to fix it."""
        if isinstance(self.eval_files, str):
            self.eval_files = [self.eval_files]
        if not self.eval_files:
            raise ValueError(
                "eval_files: expected at least one JSONL path; pass --eval_files FILE [FILE ...]"
            )
        if not self.seeds:
            raise ValueError("seeds: expected at least one seed; pass e.g. --seeds 10 20 30 40 50")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {self.seeds} repeats a seed; list each seed once")
        require(
            self.max_eval_samples is None or self.max_eval_samples >= 1, "max_eval_samples", ">= 1 or unset"
        )
        self.generation_settings()  # checks the generation fields
        if self.prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(
                f"prompt_template: got {self.prompt_template!r}; choose one of {', '.join(PROMPT_TEMPLATES)}"
            )

    @property
    def effective_seeds(self) -> list[int]:
        """The seeds actually run: all of them when sampling, only the first for greedy decoding."""
        return list(self.seeds) if self.do_sample else [self.seeds[0]]

    def generation_settings(self) -> GenerationSettings:
        """This run's generation settings (validated)."""
        return GenerationSettings(
            **{name.name: getattr(self, name.name) for name in fields(GenerationSettings)}
        )

    def generation_kwargs(self) -> dict[str, Any]:
        """This run's generation settings as keyword arguments for :func:`generate_responses`."""
        return asdict(self.generation_settings())
