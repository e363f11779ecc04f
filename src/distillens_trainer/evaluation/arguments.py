"""Settings of a ``distillens eval`` run."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.arguments import PROMPT_TEMPLATES
from .generation import GenerationSettings, require

PAPER_SEEDS = (10, 20, 30, 40, 50)


@dataclass
class EvalArguments:
    """Settings of a generation-quality evaluation run, parseable with `transformers.HfArgumentParser`.

    The default seeds are the paper's protocol (MiniLLM): five seeds, 10 to 50.

    ``distillens eval`` parses two more dataclasses alongside: :class:`distillens_trainer.models.loading.ModelArguments`
    (the model to evaluate and how it is loaded: model_name_or_path, gguf_file, tokenizer_name_or_path, dtype,
    attn_implementation, trust_remote_code) and :class:`GenerationSettings` (how responses are generated:
    do_sample, temperature, top_p, top_k, no_repeat_ngram_size, max_new_tokens, max_prompt_length, batch_size,
    with the paper's protocol as defaults).
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
    prompt_template: str = field(
        default="alpaca",
        metadata={
            "help": "Prompt format: alpaca (paper), chat (tokenizer template) or plain. On the command line the "
            "default is the format recorded with the model (distillens.json), else chat when its tokenizer has a chat "
            "template, else alpaca.",
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
        if self.prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(
                f"prompt_template: got {self.prompt_template!r}; choose one of {', '.join(PROMPT_TEMPLATES)}"
            )

    def effective_seeds(self, settings: GenerationSettings) -> list[int]:
        """The seeds actually run with `settings`: all of them when sampling, only the first for greedy decoding."""
        return list(self.seeds) if settings.do_sample else [self.seeds[0]]
