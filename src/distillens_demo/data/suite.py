"""The demo's task suite from the families in :mod:`.tasks`: seeded, disjoint train/validation/test splits,
JSONL files, the exact-match scorer and the byte-level BPE tokenizer trained on the suite.

Everything is deterministic given a seed: generators draw only from the ``random.Random`` they are given.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from distillens_trainer.data.prompts import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    build_prompt,
    format_alpaca_prompt,
)

from .tasks import TASK_FAMILIES, Example, describe_task, resolve_tasks

EXAMPLE_FIELDS = ("instruction", "input", "output", "task")
SPLIT_FILES = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
DEFAULT_NUM_TRAIN = 4000
DEFAULT_NUM_EVAL = 200
DEFAULT_NUM_TEST = 200

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
DEFAULT_VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 1024
_BYTE_ALPHABET_SIZE = 256
_MIN_VOCAB_SIZE = _BYTE_ALPHABET_SIZE + 2  # every byte plus the two special tokens
# Rejections in a row after which a family counts as exhausted (a false alarm needs ~e^-15 bad luck).
_MAX_CONSECUTIVE_REPEATS = 10_000


def _check_count(name: str, value: object) -> int:
    """A non-negative integer argument, or a one-line ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    return value


def _check_seed(seed: object) -> int:
    """An integer seed, or a one-line ValueError (strings and floats would seed differently than expected)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    return seed


def balanced_counts(num_examples: int, names: Sequence[str]) -> dict[str, int]:
    """Split ``num_examples`` over ``names`` as evenly as possible; earlier names get the remainder."""
    base, remainder = divmod(num_examples, len(names))
    return {name: base + (1 if index < remainder else 0) for index, name in enumerate(names)}


def example_key(example: Example) -> tuple[str, str]:
    """What makes two examples "the same question": their instruction and input."""
    return example["instruction"], example["input"]


def _draw(
    rng: random.Random,
    names: Sequence[str],
    num_examples: int,
    *,
    exclude: frozenset[tuple[str, str]] = frozenset(),
    unique: bool = False,
    size_name: str = "num_examples",
) -> list[Example]:
    """Balanced, shuffled examples whose keys avoid ``exclude`` (and each other when ``unique``)."""
    examples: list[Example] = []
    for name, count in balanced_counts(num_examples, names).items():
        generator, seen, misses = TASK_FAMILIES[name], set(exclude), 0
        while count:
            example = generator(rng)
            if example_key(example) in seen:
                misses += 1
                if misses >= _MAX_CONSECUTIVE_REPEATS:
                    raise ValueError(
                        f"{size_name}={num_examples} needs more distinct {name!r} examples than the family holds; lower it"
                    )
                continue
            examples.append(example)
            count, misses = count - 1, 0
            if unique:
                seen.add(example_key(example))
    rng.shuffle(examples)
    return examples


def generate_examples(num_examples: int, seed: int, tasks: Sequence[str] | None = None) -> list[Example]:
    """``num_examples`` examples balanced across ``tasks`` (all families by default), shuffled.

    The list depends only on the arguments: the same seed gives the same list in any process.
    Examples may repeat within the list; `write_task_suite` is the way to get disjoint splits.
    """
    names = resolve_tasks(tasks)
    return _draw(random.Random(_check_seed(seed)), names, _check_count("num_examples", num_examples))


# ---------------------------------------------------------------------------------------------------------
# Writing the suite to disk
# ---------------------------------------------------------------------------------------------------------


def write_jsonl(path: str | Path, examples: Iterable[Example]) -> Path:
    """Write one JSON object per line (UTF-8) and return the path."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[Example]:
    """Read a JSONL file written by `write_jsonl` (blank lines are skipped)."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def make_splits(
    *, num_train: int, num_eval: int, num_test: int, seed: int, tasks: Sequence[str] | None = None
) -> dict[str, list[Example]]:
    """Train/validation/test examples; no validation or test question (instruction, input) occurs in train.

    Test is drawn first, then validation (distinct from test), then train avoiding both, each from its own
    seeded stream, so changing one split's size never changes the examples of the splits drawn before it.
    Held-out examples are distinct within their split; train may repeat questions.
    """
    names, seed = resolve_tasks(tasks), _check_seed(seed)
    size_names = {"test": "num_test", "validation": "num_eval", "train": "num_train"}
    sizes = {"test": num_test, "validation": num_eval, "train": num_train}
    sizes = {split: _check_count(size_names[split], size) for split, size in sizes.items()}
    splits: dict[str, list[Example]] = {}
    held_out: frozenset[tuple[str, str]] = frozenset()
    for split, size in sizes.items():
        rng = random.Random(f"distillens-tasks:{seed}:{split}")
        unique = split != "train"
        splits[split] = _draw(rng, names, size, exclude=held_out, unique=unique, size_name=size_names[split])
        held_out |= {example_key(example) for example in splits[split]}
    return {split: splits[split] for split in SPLIT_FILES}


def _suite_summary(splits: dict[str, list[Example]], names: Sequence[str], seed: int) -> dict[str, object]:
    """The machine-readable description stored in ``suite.json``."""
    return {
        "name": "distillens-task-suite",
        "seed": seed,
        "fields": list(EXAMPLE_FIELDS),
        "files": {split: SPLIT_FILES[split] for split in splits},
        "counts": {split: len(examples) for split, examples in splits.items()},
        "counts_per_task": {
            split: dict(sorted(Counter(example["task"] for example in examples).items()))
            for split, examples in splits.items()
        },
        "tasks": {name: describe_task(name) for name in names},
    }


def _suite_readme(summary: dict[str, object]) -> str:
    """A short human-readable README for a written suite."""
    counts = summary["counts"]
    lines = [
        "# DistillLens procedural task suite",
        "",
        "Synthetic instruction data generated offline by `distillens_demo.data.suite.write_task_suite`",
        f"(seed {summary['seed']}). Each line of the JSONL files is",
        '`{"instruction": ..., "input": ..., "output": ..., "task": ...}`; no validation or test',
        "(instruction, input) pair appears in the training file.",
        "",
        "| split | file | examples |",
        "| --- | --- | --- |",
        *(f"| {split} | `{file}` | {counts[split]} |" for split, file in summary["files"].items()),
        "",
        "| task | description |",
        "| --- | --- |",
        *(f"| `{name}` | {description} |" for name, description in summary["tasks"].items()),
        "",
    ]
    return "\n".join(lines)


def write_task_suite(
    output_dir: str | Path,
    *,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_eval: int = DEFAULT_NUM_EVAL,
    num_test: int = DEFAULT_NUM_TEST,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write ``train.jsonl``, ``validation.jsonl``, ``test.jsonl``, ``suite.json`` and ``README.md``.

    Returns the written paths keyed ``train``, ``validation``, ``test``, ``suite`` and ``readme``.
    """
    names = resolve_tasks(tasks)
    splits = make_splits(num_train=num_train, num_eval=num_eval, num_test=num_test, seed=seed, tasks=names)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        split: write_jsonl(output_dir / SPLIT_FILES[split], examples) for split, examples in splits.items()
    }
    summary = _suite_summary(splits, names, seed)
    paths["suite"] = output_dir / "suite.json"
    paths["suite"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    paths["readme"] = output_dir / "README.md"
    paths["readme"].write_text(_suite_readme(summary), encoding="utf-8")
    return paths


# ---------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------


def normalize_exact_answer(text: str) -> str:
    """Exact-match normal form: trimmed, lowercased, whitespace collapsed, one trailing period dropped."""
    text = re.sub(r"\s+", " ", text).strip().lower()
    return text.removesuffix(".").rstrip()


def score_answer(prediction: str, reference: str) -> bool:
    """Whether a generated answer matches the reference after `normalize_exact_answer`."""
    return normalize_exact_answer(prediction) == normalize_exact_answer(reference)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


def format_example(example: Example) -> str:
    """The full training text of an example: its Alpaca prompt followed by the answer."""
    return format_alpaca_prompt(example["instruction"], example["input"]) + example["output"]


def _template_skeletons() -> list[str]:
    """The Alpaca templates with empty slots, so the template is always in the tokenizer's training text."""
    return [
        ALPACA_PROMPT_WITH_INPUT.format(instruction="", input=""),
        ALPACA_PROMPT_NO_INPUT.format(instruction=""),
    ]


def train_suite_tokenizer(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    Digits are always split one per token (so arithmetic is learnable); every byte is in the base
    alphabet, so any string encodes and decodes back exactly. ``<|endoftext|>`` serves as eos, bos and
    unk; ``<|pad|>`` is a separate pad token. The Alpaca template skeletons are added to ``texts``; for a
    compact template pass formatted prompts too (as `build_suite_tokenizer` does). Returns a
    ``transformers.PreTrainedTokenizerFast`` with at most ``vocab_size`` tokens.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an integer of at least {_MIN_VOCAB_SIZE} (256 bytes + 2 specials); got {vocab_size!r}"
        )
    if isinstance(texts, str):
        raise ValueError("texts must be an iterable of strings, not a single string; wrap it in a list")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*_template_skeletons(), *texts], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def build_suite_tokenizer(
    output_dir: str | Path, examples: Iterable[Example], vocab_size: int = DEFAULT_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Train the suite tokenizer on the formatted prompts and answers of ``examples`` and save it.

    ``AutoTokenizer.from_pretrained(output_dir)`` reloads it offline with identical encodings.
    """
    tokenizer = train_suite_tokenizer((format_example(example) for example in examples), vocab_size)
    tokenizer.save_pretrained(str(output_dir))
    return tokenizer


def prompt_of(example: Mapping[str, str], template: str) -> str:
    """The prompt a model is trained on and generates from."""
    return build_prompt(example, None, template)


def default_max_new_tokens(examples: Sequence[Mapping[str, str]], tokenizer: Any) -> int:
    """The longest reference answer in tokens, plus room for EOS and a little overshoot."""
    lengths = [len(tokenizer(example["output"], add_special_tokens=False).input_ids) for example in examples]
    return max(lengths, default=8) + 4
