"""Generation-quality evaluation with the MiniLLM protocol used by the DistillLens paper.

The protocol: build the Alpaca prompt for every example, sample a response per seed
(temperature 1.0, top-p 1.0, top-k 0, no-repeat-ngram 6, 256 new tokens, prompts capped at 256
tokens, seeds 10/20/30/40/50), score each response with ROUGE-L against all references, and
report the mean and standard deviation over seeds.

Scoring follows MiniLLM's ``rouge_metric.py`` exactly:

- ROUGE-L is the ``rouge_score`` F-measure with the Porter stemmer and the package's default
  tokenizer (lowercase, non-alphanumeric characters dropped), maximised over the references and
  multiplied by 100.
- Exact match uses the SQuAD normalisation without article removal: lowercase, remove every ASCII
  punctuation character, collapse whitespace (which also strips the ends).

The module offers a command-line style entry point (:class:`EvalArguments`, :func:`run_evaluation`),
a library entry point (:func:`evaluate_files`) and a training-time callback
(:class:`RougeEvalCallback`) that adds ``eval_rougeL`` / ``eval_exact_match`` to the Trainer's
evaluation metrics so they can drive ``metric_for_best_model``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import string
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import transformers
from rouge_score import rouge_scorer
from tqdm.auto import tqdm
from transformers import GenerationConfig, TrainerCallback

from .data import PROMPT_TEMPLATES, build_prompt, tokenizer_adds_bos
from .files import write_text_atomic
from .limits import check_fits_context

logger = logging.getLogger(__name__)

REPORT_FILENAME = "report.json"
GENERATIONS_SUFFIX = ".generations.jsonl"
DTYPES = ("auto", "float32", "bfloat16", "float16")
PAPER_SEEDS = (10, 20, 30, 40, 50)

ROUGE_DESCRIPTION = (
    "ROUGE-L F-measure x100 (rouge_score, Porter stemmer, default tokenizer), max over references"
)
EXACT_MATCH_DESCRIPTION = (
    "100 if the normalised prediction equals a normalised reference (lowercase, ASCII punctuation "
    "removed, whitespace collapsed), else 0"
)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    """The shared ROUGE-L scorer, configured like MiniLLM (stemming on, default tokenizer)."""
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _check_references(references: Sequence[str]) -> None:
    """Reject an empty reference list, which would make the max over references undefined."""
    if isinstance(references, str) or len(references) == 0:
        raise ValueError(
            "references: expected a non-empty list of strings; wrap a single reference in a list"
        )


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (0-100) of `prediction`, maximised over `references`.

    Uses ``rouge_score`` with ``use_stemmer=True`` as in MiniLLM's evaluation. Text without any
    ASCII letter or digit tokenises to nothing and scores 0, even against itself.
    """
    _check_references(references)
    scorer = _rouge_l_scorer()
    return max(
        100.0 * scorer.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in references
    )


_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: lowercase, drop ASCII punctuation, collapse and strip whitespace."""
    return " ".join(text.lower().translate(_PUNCTUATION_TABLE).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100.0 if the normalised `prediction` equals any normalised reference, else 0.0."""
    _check_references(references)
    normalized = normalize_answer(prediction)
    return 100.0 if any(normalized == normalize_answer(ref) for ref in references) else 0.0


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for a single value) of per-seed scores."""
    if not values:
        raise ValueError("values: expected at least one per-seed score")
    return statistics.fmean(values), statistics.pstdev(values)


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalArguments:
    """Settings of a generation-quality evaluation run, parseable with `transformers.HfArgumentParser`.

    The defaults are the paper's protocol (MiniLLM): sampling at temperature 1.0 with top-p 1.0,
    top-k 0 (disabled), no-repeat-ngram 6, five seeds, 256 new tokens, 256-token prompts.
    """

    model_name_or_path: str = field(metadata={"help": "Model directory or name to evaluate (causal LM)."})
    output_dir: str = field(metadata={"help": "Directory for report.json and <name>.generations.jsonl."})
    eval_files: list[str] = field(
        metadata={"help": "One or more JSONL files with `instruction`, optional `input`, `output`/`outputs`."}
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "Evaluate the model in this GGUF file inside model_name_or_path (de-quantised; the "
            "tokenizer too unless tokenizer_name_or_path is given). Needs the gguf extra."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer directory or name; defaults to model_name_or_path."}
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
        default=True, metadata={"help": "Sample (paper protocol); pass --no_do_sample for greedy decoding."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1]; 1.0 disables it."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (>= 0); 0 disables it."})
    no_repeat_ngram_size: int = field(
        default=6, metadata={"help": "Forbid repeating n-grams of this size (>= 0); 0 disables it."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Maximum number of generated tokens."})
    max_prompt_length: int = field(
        default=256, metadata={"help": "Prompts longer than this many tokens keep only their last tokens."}
    )
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate() call."})
    prompt_template: str = field(
        default="alpaca",
        metadata={
            "help": "Prompt format: alpaca (paper), chat (tokenizer template) or plain. On the command line the "
            "default is the format recorded with the model (distillens.json), else alpaca.",
            "choices": list(PROMPT_TEMPLATES),
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Model weights dtype: auto, float32, bfloat16 or float16.",
            "choices": list(DTYPES),
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
        _require(
            self.max_eval_samples is None or self.max_eval_samples >= 1, "max_eval_samples", ">= 1 or unset"
        )
        _require(self.temperature > 0, "temperature", "> 0")
        _require(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        _require(self.top_k >= 0, "top_k", ">= 0 (0 disables top-k)")
        _require(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", ">= 0 (0 disables it)")
        _require(self.max_new_tokens >= 1, "max_new_tokens", ">= 1")
        _require(self.max_prompt_length >= 1, "max_prompt_length", ">= 1")
        _require(self.batch_size >= 1, "batch_size", ">= 1")
        if self.prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(
                f"prompt_template: got {self.prompt_template!r}; choose one of {', '.join(PROMPT_TEMPLATES)}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: got {self.dtype!r}; choose one of {', '.join(DTYPES)}")

    @property
    def effective_seeds(self) -> list[int]:
        """The seeds actually run: all of them when sampling, only the first for greedy decoding."""
        return list(self.seeds) if self.do_sample else [self.seeds[0]]

    def generation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`generate_responses` (all but the seed)."""
        keys = (
            "batch_size",
            "max_new_tokens",
            "max_prompt_length",
            "do_sample",
            "temperature",
            "top_p",
            "top_k",
            "no_repeat_ngram_size",
        )
        return {key: getattr(self, key) for key in keys}


def _require(condition: bool, name: str, expectation: str) -> None:
    """Raise a one-line ValueError naming the field when a numeric constraint fails."""
    if not condition:
        raise ValueError(f"{name}: must be {expectation}; fix the value passed for --{name}")


# --------------------------------------------------------------------------------------------------
# Data and prompts
# --------------------------------------------------------------------------------------------------


def references_of(example: dict[str, Any]) -> list[str]:
    """All references of an example: `outputs` when present, else `output` (a string or a list)."""
    refs = example.get("outputs", example.get("output"))
    return [refs] if isinstance(refs, str) else list(refs)


def _check_example(example: Any, where: str) -> None:
    """Reject a row that lacks an instruction or a usable reference."""
    if not isinstance(example, dict):
        raise ValueError(f"{where}: expected a JSON object with `instruction` and `output` fields")
    if not isinstance(example.get("instruction"), str):
        raise ValueError(f"{where}: missing string field `instruction`; add it to every row")
    refs = example.get("outputs", example.get("output"))
    valid_list = isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)
    if not (isinstance(refs, str) or valid_list):
        raise ValueError(
            f"{where}: missing field `output` (a string) or `outputs` (a list of strings); add it"
        )


def load_eval_examples(path: str | os.PathLike[str], max_samples: int | None = None) -> list[dict[str, Any]]:
    """Read a JSONL eval file (blank lines skipped) and return its first `max_samples` rows."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"eval_files: no such file {str(path)!r}; pass an existing JSONL path")
    examples: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"eval_files: {path}:{line_number}"
            try:
                example = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{where}: invalid JSON ({error.msg}); write one JSON object per line"
                ) from None
            _check_example(example, where)
            examples.append(example)
            if max_samples is not None and len(examples) >= max_samples:
                break
    if not examples:
        raise ValueError(f"eval_files: {str(path)!r} holds no examples; pass a non-empty JSONL file")
    return examples


def unique_file_names(paths: Sequence[str]) -> list[str]:
    """Short names for eval files: the stem, or `<parent>_<stem>` when stems collide (e.g. valid.jsonl)."""
    stems = [Path(p).stem for p in paths]
    names = [f"{Path(p).parent.name}_{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)]
    if len(set(names)) != len(names):
        raise ValueError(f"eval_files: {list(paths)} contains duplicate files; list each file once")
    return names


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def _pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to its EOS id."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer: has neither a pad token nor an EOS token; set tokenizer.pad_token first")
    return pad_id


def _eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids from the model's generation config plus the tokenizer's EOS, in a stable order."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = []
    elif isinstance(configured, int):
        configured = [configured]
    ids = list(configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def truncate_left(ids: list[int], max_length: int, bos_token_id: int | None = None) -> list[int]:
    """Keep the last `max_length` ids; a leading BOS token is preserved in front of the kept tail."""
    if len(ids) <= max_length:
        return ids
    if bos_token_id is not None and ids[0] == bos_token_id and max_length > 1:
        return [ids[0], *ids[len(ids) - max_length + 1 :]]
    return ids[len(ids) - max_length :]


def encode_prompt(tokenizer: Any, prompt: str, add_bos: bool) -> list[int]:
    """Prompt ids as training sees them: no special tokens, plus BOS in front when `add_bos` and absent."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    return [bos, *ids] if add_bos and bos is not None and ids[:1] != [bos] else ids


def left_pad(batch: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a batch of id lists to a rectangle; returns (input_ids, attention_mask)."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def cut_at_eos(ids: Iterable[int], eos_ids: Iterable[int]) -> list[int]:
    """The ids before the first EOS token."""
    stop = set(eos_ids)
    kept: list[int] = []
    for token in ids:
        if token in stop:
            break
        kept.append(token)
    return kept


def build_generation_config(
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    top_k: int,
    no_repeat_ngram_size: int,
    pad_token_id: int,
    eos_token_id: list[int],
    bos_token_id: int | None = None,
) -> GenerationConfig:
    """A clean generation config holding the protocol's values and the special-token ids, nothing else.

    :func:`generate_responses` also installs it as the model's ``generation_config`` while generating, because
    ``generate`` fills every unset field from the model's own (a checkpoint's ``min_new_tokens``, ``min_p``,
    ``typical_p``, ... would otherwise add logits processors the protocol does not have).
    """
    settings: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "num_beams": 1,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": no_repeat_ngram_size,
        "pad_token_id": pad_token_id,
        "eos_token_id": eos_token_id,
        "bos_token_id": bos_token_id,
    }
    if do_sample:
        settings.update(temperature=temperature, top_p=top_p, top_k=top_k)
    return GenerationConfig(**settings)


@contextlib.contextmanager
def only_generation_config(model: Any, config: GenerationConfig) -> Iterator[None]:
    """Within the block, `config` is the ``generation_config`` of `model` and of every module inside it (PEFT)."""
    owners = [
        module
        for module in model.modules()
        if isinstance(getattr(module, "generation_config", None), GenerationConfig)
    ]
    saved = [owner.generation_config for owner in owners]
    for owner in owners:
        owner.generation_config = config
    try:
        yield
    finally:
        for owner, original in zip(owners, saved):
            owner.generation_config = original


def _synced_gpus() -> bool:
    """True under multi-process DeepSpeed ZeRO-3, where every rank must run each forward pass."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return bool(is_deepspeed_zero3_enabled()) and world_size > 1


def _model_device(model: Any) -> torch.device:
    """The device inputs must be placed on."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    max_prompt_length: int = 256,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    no_repeat_ngram_size: int = 6,
    seed: int = 10,
    show_progress: bool = True,
) -> list[str]:
    """Generate one response per prompt, returned in the order of `prompts`.

    Prompts are tokenised like training prompts (BOS only where the tokenizer adds one),
    left-truncated to `max_prompt_length` tokens, sorted longest-first and left-padded into batches;
    the tokenizer itself is not modified. The pad id falls back to EOS. Only new tokens up to the first EOS are decoded, with special tokens
    skipped and surrounding whitespace stripped. The RNG is seeded with `seed` before the first
    batch, so results are reproducible for a fixed batch size (greedy results do not depend on it).
    Under multi-process DeepSpeed ZeRO-3 every rank must call this with the same prompts.
    """
    if batch_size < 1:
        raise ValueError("batch_size: must be >= 1; pass a positive batch size")
    if not prompts:
        return []
    pad_id = _pad_token_id(tokenizer)
    eos_ids = _eos_token_ids(model, tokenizer)
    config = build_generation_config(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        no_repeat_ngram_size=no_repeat_ngram_size,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        bos_token_id=tokenizer.bos_token_id,
    )
    add_bos = tokenizer_adds_bos(tokenizer)
    encoded = [
        truncate_left(encode_prompt(tokenizer, p, add_bos), max_prompt_length, tokenizer.bos_token_id)
        for p in prompts
    ]
    longest = max(len(ids) for ids in encoded)
    check_fits_context(
        longest + max_new_tokens,
        model.config,
        model="model",
        setting=f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens}",
        fix="lower max_prompt_length or max_new_tokens so that they sum to at most {limit}",
    )
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    device = _model_device(model)
    synced_gpus = _synced_gpus()
    responses: list[str] = [""] * len(prompts)

    transformers.set_seed(seed)
    was_training = model.training
    model.eval()
    starts = range(0, len(order), batch_size)
    try:
        with torch.inference_mode(), only_generation_config(model, config):
            for start in tqdm(starts, desc=f"generate (seed {seed})", disable=not show_progress):
                indices = order[start : start + batch_size]
                input_ids, attention_mask = left_pad([encoded[i] for i in indices], pad_id)
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                    synced_gpus=synced_gpus,
                )
                new_tokens = output[:, input_ids.shape[1] :].tolist()
                for index, ids in zip(indices, new_tokens):
                    text = tokenizer.decode(cut_at_eos(ids, eos_ids), skip_special_tokens=True)
                    responses[index] = text.strip()
    finally:
        model.train(was_training)
    return responses


# --------------------------------------------------------------------------------------------------
# File evaluation
# --------------------------------------------------------------------------------------------------


def check_output_dir(args: EvalArguments) -> None:
    """Refuse to replace an existing report unless `overwrite_output_dir` is set."""
    if (Path(args.output_dir) / REPORT_FILENAME).exists() and not args.overwrite_output_dir:
        raise ValueError(
            f"output_dir: {args.output_dir!r} already holds {REPORT_FILENAME}; "
            "pass --overwrite_output_dir to replace it or choose another output_dir"
        )


def protocol_of(args: EvalArguments) -> dict[str, Any]:
    """The generation and scoring settings recorded in the report."""
    return {
        "do_sample": args.do_sample,
        "temperature": args.temperature if args.do_sample else None,
        "top_p": args.top_p if args.do_sample else None,
        "top_k": args.top_k if args.do_sample else None,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "max_new_tokens": args.max_new_tokens,
        "max_prompt_length": args.max_prompt_length,
        "prompt_truncation": "left",
        "seeds": args.effective_seeds,
        "batch_size": args.batch_size,
        "prompt_template": args.prompt_template,
        "max_eval_samples": args.max_eval_samples,
        "dtype": args.dtype,
        "rougeL": ROUGE_DESCRIPTION,
        "exact_match": EXACT_MATCH_DESCRIPTION,
        "std": "population standard deviation over seeds",
    }


def score_responses(responses: Sequence[str], references: Sequence[Sequence[str]]) -> list[dict[str, float]]:
    """Per-example rougeL and exact_match scores."""
    return [
        {"rougeL": rouge_l(response, refs), "exact_match": exact_match(response, refs)}
        for response, refs in zip(responses, references)
    ]


def _summary(per_seed: list[float]) -> dict[str, Any]:
    """The {mean, std, per_seed} block of the report."""
    mean, std = mean_and_std(per_seed)
    return {"mean": mean, "std": std, "per_seed": per_seed}


def evaluate_file(
    model: Any, tokenizer: Any, args: EvalArguments, path: str, name: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate and score one eval file for every seed; returns (report entry, generation records)."""
    examples = load_eval_examples(path, args.max_eval_samples)
    prompts = [build_prompt(example, tokenizer, args.prompt_template) for example in examples]
    references = [references_of(example) for example in examples]
    records: list[dict[str, Any]] = []
    per_seed: dict[str, list[float]] = {"rougeL": [], "exact_match": []}
    for seed in args.effective_seeds:
        responses = generate_responses(model, tokenizer, prompts, seed=seed, **args.generation_kwargs())
        scores = score_responses(responses, references)
        for metric, values in per_seed.items():
            values.append(statistics.fmean(score[metric] for score in scores))
        for example, prompt, refs, response, score in zip(examples, prompts, references, responses, scores):
            records.append(
                {
                    "instruction": example["instruction"],
                    "input": example.get("input") or "",
                    "prompt": prompt,
                    "references": refs,
                    "seed": seed,
                    "generation": response,
                    **score,
                }
            )
        logger.info("%s seed %d: rougeL %.2f", name, seed, per_seed["rougeL"][-1])
    entry = {
        "file": str(path),
        "name": name,
        "num_examples": len(examples),
        "rougeL": _summary(per_seed["rougeL"]),
        "exact_match": _summary(per_seed["exact_match"]),
    }
    return entry, records


def evaluate_files(model: Any, tokenizer: Any, args: EvalArguments) -> dict[str, Any]:
    """Evaluate `model` on every file of `args.eval_files` and write the report and generations.

    Writes `<output_dir>/<name>.generations.jsonl` after each file (one line per example per seed)
    and `<output_dir>/report.json` at the end, both atomically. Returns the report dict.
    """
    check_output_dir(args)
    names = unique_file_names(args.eval_files)
    for path in args.eval_files:  # fail on a bad file before spending time on generation
        load_eval_examples(path, args.max_eval_samples)
    output_dir = Path(args.output_dir)
    results = []
    for path, name in zip(args.eval_files, names):
        entry, records = evaluate_file(model, tokenizer, args, path, name)
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        write_text_atomic(output_dir / f"{name}{GENERATIONS_SUFFIX}", lines)
        results.append(entry)
    report = {"model": args.model_name_or_path, "protocol": protocol_of(args), "results": results}
    write_text_atomic(output_dir / REPORT_FILENAME, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def _torch_dtype(name: str) -> str | torch.dtype:
    """The `dtype` argument for from_pretrained."""
    return "auto" if name == "auto" else getattr(torch, name)


def run_evaluation(args: EvalArguments) -> dict[str, Any]:
    """Load the model and tokenizer named in `args`, evaluate every file, and return the report.

    Runs in a single process on the first CUDA device when one is available, else on the CPU.
    """
    check_output_dir(args)
    from .models import load_causal_lm, load_tokenizer_from, read_config

    check_fits_context(  # before any weights are read
        args.max_prompt_length + args.max_new_tokens,
        read_config(args.model_name_or_path, args.gguf_file),
        model="model",
        setting=f"--max_prompt_length {args.max_prompt_length} + --max_new_tokens {args.max_new_tokens}",
        fix="pass a --max_prompt_length and --max_new_tokens that sum to at most {limit}",
    )
    if args.tokenizer_name_or_path:
        tokenizer = load_tokenizer_from(args.tokenizer_name_or_path)
    else:
        tokenizer = load_tokenizer_from(args.model_name_or_path, args.gguf_file)
    model = load_causal_lm(args.model_name_or_path, gguf_file=args.gguf_file, dtype=_torch_dtype(args.dtype))
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    return evaluate_files(model, tokenizer, args)


def output_summary(args: EvalArguments, report: dict[str, Any]) -> str:
    """The last line of ``distillens eval``: where the report and the generations went."""
    names = ",".join(result["name"] for result in report["results"])
    generations = f"{{{names}}}" if len(report["results"]) > 1 else names
    return (
        f"distillens eval: report in {Path(args.output_dir) / REPORT_FILENAME}, generations in "
        f"{Path(args.output_dir) / generations}{GENERATIONS_SUFFIX} (prompt format {args.prompt_template!r})."
    )


# --------------------------------------------------------------------------------------------------
# Training-time callback
# --------------------------------------------------------------------------------------------------


def _broadcast_from_main(values: dict[str, float]) -> dict[str, float]:
    """Rank 0's values on every rank (a no-op outside torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    if torch.distributed.get_world_size() == 1:
        return values
    box = [values]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class RougeEvalCallback(TrainerCallback):
    """Add generation metrics (`eval_rougeL`, `eval_exact_match`) to every Trainer evaluation.

    On each `on_evaluate` the callback generates responses for the first `num_samples` dev
    examples, scores them, and writes the scores into the Trainer's `metrics` dict in place, so
    `metric_for_best_model="eval_rougeL"` and `load_best_model_at_end=True` work. The scores are
    also added to the latest evaluation entry of `state.log_history`. Logging integrations
    (TensorBoard, W&B) have already received that evaluation's logs when the callback runs, so
    they do not see these two values.

    Defaults favour speed: greedy decoding (one deterministic pass) with the paper's
    no-repeat-ngram 6 and token limits. With sampling, `seed` fixes the RNG for each evaluation.

    Distributed training: every rank generates on the full subset (so all ranks take part in each
    forward pass, as DeepSpeed ZeRO-3 requires; `synced_gpus` is set automatically there), and
    rank 0's scores are broadcast so every rank records the same metrics and picks the same best
    checkpoint. Register this callback before any callback that reads these metrics, such as
    `EarlyStoppingCallback`.
    """

    def __init__(
        self,
        tokenizer: Any,
        eval_examples: Sequence[dict[str, Any]] | str | os.PathLike[str],
        num_samples: int | None = 200,
        *,
        prompt_template: str = "alpaca",
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        no_repeat_ngram_size: int = 6,
        max_new_tokens: int = 256,
        max_prompt_length: int = 256,
        batch_size: int = 8,
        seed: int = 10,
        metric_prefix: str = "eval",
        show_progress: bool = False,
    ) -> None:
        """Prepare prompts and references for the first `num_samples` examples (all when None)."""
        if num_samples is not None and num_samples < 1:
            raise ValueError("num_samples: must be >= 1 or None (all examples); pass a positive number")
        if isinstance(eval_examples, str | os.PathLike):
            examples = load_eval_examples(eval_examples, num_samples)
        else:
            examples = list(eval_examples)[:num_samples]
            for index, example in enumerate(examples):
                _check_example(example, f"eval_examples[{index}]")
        if not examples:
            raise ValueError("eval_examples: got no examples; pass a non-empty list or JSONL path")
        if prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(
                f"prompt_template: got {prompt_template!r}; choose one of {', '.join(PROMPT_TEMPLATES)}"
            )
        self.tokenizer = tokenizer
        self.prompts = [build_prompt(example, tokenizer, prompt_template) for example in examples]
        self.references = [references_of(example) for example in examples]
        self.metric_prefix = metric_prefix
        self.seed = seed
        self.show_progress = show_progress
        self.generation_kwargs: dict[str, Any] = {
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "max_prompt_length": max_prompt_length,
            "do_sample": do_sample,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "no_repeat_ngram_size": no_repeat_ngram_size,
        }

    def compute_metrics(self, model: Any) -> dict[str, float]:
        """Generate on the dev subset and return `{<prefix>_rougeL, <prefix>_exact_match}`."""
        responses = generate_responses(
            model,
            self.tokenizer,
            self.prompts,
            seed=self.seed,
            show_progress=self.show_progress,
            **self.generation_kwargs,
        )
        scores = score_responses(responses, self.references)
        return {
            f"{self.metric_prefix}_{metric}": statistics.fmean(score[metric] for score in scores)
            for metric in ("rougeL", "exact_match")
        }

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        """Add the generation metrics to `metrics` (in place) and to the last eval log entry."""
        if model is None or metrics is None:
            logger.warning("RougeEvalCallback: no model or metrics passed to on_evaluate; skipping")
            return control
        values = _broadcast_from_main(self.compute_metrics(model))
        logged_keys = set(metrics)
        metrics.update(values)
        for entry in reversed(state.log_history):  # the entry Trainer.log wrote for this evaluation
            if logged_keys & set(entry):
                entry.update(values)
                break
        return control


__all__ = [
    "EvalArguments",
    "RougeEvalCallback",
    "evaluate_files",
    "exact_match",
    "generate_responses",
    "load_eval_examples",
    "normalize_answer",
    "rouge_l",
    "run_evaluation",
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point: `python -m distillens_trainer.evaluation --model_name_or_path ...`."""
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(args=argv)
    report = run_evaluation(args)
    for entry in report["results"]:
        rouge = entry["rougeL"]
        print(f"{entry['name']}: rougeL {rouge['mean']:.2f} ± {rouge['std']:.2f} (n={entry['num_examples']})")
    return report


if __name__ == "__main__":
    main()
