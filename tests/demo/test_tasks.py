"""Tests for the procedural task suite, its splits on disk, exact-match scoring and the suite tokenizer."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable

import pytest

from distillens_demo.data.suite import (
    EOS_TOKEN,
    PAD_TOKEN,
    build_suite_tokenizer,
    format_example,
    generate_examples,
    make_splits,
    read_jsonl,
    score_answer,
    train_suite_tokenizer,
    write_task_suite,
)
from distillens_demo.data.tasks import TASK_FAMILIES
from distillens_trainer.data import format_alpaca_prompt

FIELDS = {"instruction", "input", "output", "task"}
SAMPLES_PER_FAMILY = 150


def _examples_of(task: str, count: int = SAMPLES_PER_FAMILY, seed: int = 7) -> list[dict]:
    return generate_examples(count, seed=seed, tasks=[task])


def _items(text: str) -> list[str]:
    return text.split(", ")


def _last_word(text: str) -> str:
    return re.findall(r"\w+", text)[-1]


# --- Independent solvers: each re-derives the answer from the text a model would see. -------------------


def _solve_arithmetic(example: dict) -> str:
    left, op, right = re.search(
        r"(\d+) ([-+*]) (\d+)", example["instruction"] + " " + example["input"]
    ).groups()
    return str({"+": int.__add__, "-": int.__sub__, "*": int.__mul__}[op](int(left), int(right)))


def _solve_sort_list(example: dict) -> str:
    items = _items(example["input"])
    instruction = example["instruction"].lower()
    descending = any(cue in instruction for cue in ("descending", "largest to smallest", "reverse", "z to a"))
    numeric = all(item.isdigit() for item in items)
    ordered = sorted(items, key=int if numeric else str, reverse=descending)
    return ", ".join(ordered)


def _solve_key_lookup(example: dict) -> str:
    table = dict(pair.split("=") for pair in _items(example["input"]))
    return table[_last_word(example["instruction"])]


def _solve_reasoning_chain(example: dict) -> str:
    env: dict[str, int] = {}
    for statement in example["input"].split("; "):
        match = re.fullmatch(r"(\w) = (\d+)|(\w) = (\w) ([-+*]) (\d+)", statement)
        assert match, statement
        if match.group(1):
            env[match.group(1)] = int(match.group(2))
        else:
            target, source, op, operand = match.group(3, 4, 5, 6)
            value, operand = env[source], int(operand)
            env[target] = value + operand if op == "+" else value - operand if op == "-" else value * operand
    return str(env[_last_word(example["instruction"])])


def _solve_compare_numbers(example: dict) -> str:
    numbers = [int(item) for item in _items(example["input"])]
    wants_larger = any(cue in example["instruction"] for cue in ("larger", "bigger"))
    return str(max(numbers) if wants_larger else min(numbers))


def _solve_list_stats(example: dict) -> str:
    numbers = [int(item) for item in _items(example["input"])]
    instruction = example["instruction"]
    if "largest" in instruction or "maximum" in instruction:
        return str(max(numbers))
    if "smallest" in instruction or "minimum" in instruction:
        return str(min(numbers))
    if "sum" in instruction or "Add up" in instruction:
        return str(sum(numbers))
    return str(len(numbers))


def _solve_neighbor_item(example: dict) -> str:
    items = _items(example["input"])
    index = items.index(
        re.search(r"(?:after|before|follows|precedes) (\w+)", example["instruction"]).group(1)
    )
    after = any(cue in example["instruction"] for cue in ("after", "follows"))
    return items[index + 1] if after else items[index - 1]


def _solve_letter_facts(example: dict) -> str:
    word, instruction = example["input"], example["instruction"]
    quoted = re.search(r"'(\w)'", instruction)
    if quoted:
        return str(word.count(quoted.group(1)))
    if "first" in instruction or "start" in instruction:
        return word[0]
    if "last" in instruction or "end" in instruction:
        return word[-1]
    return str(len(word))


def _solve_word_transform(example: dict) -> str:
    word, instruction = example["input"], example["instruction"]
    if "vowels" in instruction:
        return re.sub("[aeiou]", "", word)
    if "dashes" in instruction:
        return "-".join(word)
    return word[::-1]


SOLVERS: dict[str, Callable[[dict], str]] = {
    "arithmetic": _solve_arithmetic,
    "sort_list": _solve_sort_list,
    "key_lookup": _solve_key_lookup,
    "reasoning_chain": _solve_reasoning_chain,
    "compare_numbers": _solve_compare_numbers,
    "list_stats": _solve_list_stats,
    "neighbor_item": _solve_neighbor_item,
    "letter_facts": _solve_letter_facts,
    "word_transform": _solve_word_transform,
    "reverse_list": lambda example: ", ".join(reversed(_items(example["input"]))),
    "copy_text": lambda example: example["input"],
}


# --- Generation -------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_examples():
    assert generate_examples(120, seed=3) == generate_examples(120, seed=3)


def test_different_seeds_give_different_examples():
    assert generate_examples(120, seed=3) != generate_examples(120, seed=4)


# Digest of generate_examples(50, seed=0) computed in another process. It pins the suite across processes
# and machines; a deliberate change to a generator must update it (print the new digest and paste it here).
GOLDEN_DIGEST = "f65dde6db41c2bcfe35426190eb6122c20fc68bff0119d59922f65c16676b5af"


def test_examples_match_the_digest_recorded_in_another_process():
    text = json.dumps(generate_examples(50, seed=0))
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == GOLDEN_DIGEST


def test_there_are_between_eight_and_twelve_families_and_a_solver_for_each():
    assert 8 <= len(TASK_FAMILIES) <= 12
    assert set(SOLVERS) == set(TASK_FAMILIES)


@pytest.mark.parametrize("task", sorted(TASK_FAMILIES))
def test_every_family_produces_schema_records_with_non_empty_strings(task):
    for example in _examples_of(task):
        assert set(example) == FIELDS
        assert all(isinstance(value, str) for value in example.values())
        assert example["instruction"].strip() and example["output"].strip()
        assert example["task"] == task
        assert example["output"] == example["output"].strip()


@pytest.mark.parametrize("task", sorted(TASK_FAMILIES))
def test_every_family_answer_matches_an_independent_solver(task):
    for example in _examples_of(task):
        assert example["output"] == SOLVERS[task](example), example


@pytest.mark.parametrize("task", sorted(TASK_FAMILIES))
def test_every_family_uses_several_instruction_wordings(task):
    wordings = {
        re.sub(r"\d+|'\w'|\b\w+(?=[?.]$)", "_", example["instruction"]) for example in _examples_of(task)
    }
    assert len(wordings) >= 2


def test_some_families_have_multi_word_outputs_and_some_have_no_input():
    examples = generate_examples(550, seed=0)
    multi_word = {example["task"] for example in examples if len(example["output"].split()) > 1}
    assert {"copy_text", "sort_list", "reverse_list"} <= multi_word
    assert any(example["input"] == "" for example in examples)


def test_examples_are_balanced_across_all_families():
    counts = Counter(example["task"] for example in generate_examples(10 * len(TASK_FAMILIES) + 3, seed=1))
    assert set(counts) == set(TASK_FAMILIES)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_selected_tasks_are_the_only_ones_generated_and_are_balanced():
    counts = Counter(
        example["task"] for example in generate_examples(31, seed=1, tasks=["arithmetic", "copy_text"])
    )
    assert sorted(counts.values()) == [15, 16]
    assert set(counts) == {"arithmetic", "copy_text"}


def test_examples_are_shuffled_rather_than_grouped_by_family():
    tasks = [example["task"] for example in generate_examples(60, seed=2, tasks=["arithmetic", "copy_text"])]
    assert tasks != sorted(tasks)


def test_unknown_task_raises_value_error_listing_valid_names():
    with pytest.raises(ValueError, match="tasks") as error:
        generate_examples(10, seed=0, tasks=["arithmetic", "telepathy"])
    assert "telepathy" in str(error.value)
    assert all(name in str(error.value) for name in TASK_FAMILIES)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"num_examples": -1, "seed": 0}, "num_examples"),
        ({"num_examples": 2.5, "seed": 0}, "num_examples"),
        ({"num_examples": 5, "seed": "0"}, "seed"),
        ({"num_examples": 5, "seed": 0, "tasks": []}, "tasks"),
        ({"num_examples": 5, "seed": 0, "tasks": ["copy_text", "copy_text"]}, "tasks"),
    ],
)
def test_bad_generation_arguments_raise_one_line_value_errors(kwargs, argument):
    with pytest.raises(ValueError, match=argument) as error:
        generate_examples(**kwargs)
    assert "\n" not in str(error.value)


def test_a_single_task_name_string_selects_that_family():
    assert {example["task"] for example in generate_examples(5, seed=0, tasks="arithmetic")} == {"arithmetic"}


# --- Splits on disk ---------------------------------------------------------------------------------------


def test_held_out_questions_never_appear_in_train_at_default_sizes():
    splits = make_splits(num_train=4000, num_eval=200, num_test=200, seed=0)
    key = lambda example: (example["instruction"], example["input"])  # noqa: E731
    train_keys = {key(example) for example in splits["train"]}
    validation_keys = [key(example) for example in splits["validation"]]
    test_keys = [key(example) for example in splits["test"]]
    assert not train_keys & set(validation_keys)
    assert not train_keys & set(test_keys)
    assert not set(validation_keys) & set(test_keys)
    assert len(set(validation_keys)) == len(validation_keys) == 200
    assert len(set(test_keys)) == len(test_keys) == 200
    assert len(splits["train"]) == 4000


def test_write_task_suite_writes_readable_jsonl_splits_and_a_description(tmp_path):
    paths = write_task_suite(tmp_path / "suite", num_train=110, num_eval=22, num_test=33, seed=5)
    assert set(paths) == {"train", "validation", "test", "suite", "readme"}
    assert [paths[split].name for split in ("train", "validation", "test")] == [
        "train.jsonl",
        "validation.jsonl",
        "test.jsonl",
    ]
    for split, expected in (("train", 110), ("validation", 22), ("test", 33)):
        lines = paths[split].read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == expected
        assert all(set(record) == FIELDS for record in records)
        assert records == read_jsonl(paths[split])
    summary = json.loads(paths["suite"].read_text(encoding="utf-8"))
    assert summary["counts"] == {"train": 110, "validation": 22, "test": 33}
    assert set(summary["tasks"]) == set(TASK_FAMILIES)
    assert sum(summary["counts_per_task"]["train"].values()) == 110
    readme = paths["readme"].read_text(encoding="utf-8")
    assert all(name in readme for name in TASK_FAMILIES)


def test_write_task_suite_is_byte_identical_for_the_same_seed(tmp_path):
    first = write_task_suite(tmp_path / "a", num_train=55, num_eval=11, num_test=11, seed=9)
    second = write_task_suite(tmp_path / "b", num_train=55, num_eval=11, num_test=11, seed=9)
    for name, path in first.items():
        assert path.read_bytes() == second[name].read_bytes()


def test_changing_the_train_size_keeps_the_held_out_splits():
    small = make_splits(num_train=50, num_eval=20, num_test=20, seed=0)
    large = make_splits(num_train=500, num_eval=20, num_test=20, seed=0)
    assert small["test"] == large["test"]
    assert small["validation"] == large["validation"]


def test_asking_for_more_distinct_held_out_examples_than_a_family_holds_raises():
    with pytest.raises(ValueError, match="num_test"):
        make_splits(num_train=0, num_eval=0, num_test=2000, seed=0, tasks=["word_transform"])


def test_negative_split_size_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match="num_eval"):
        write_task_suite(tmp_path, num_train=10, num_eval=-1, num_test=10)


# --- Scoring ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("42", "42", True),
        ("  42.\n", "42", True),
        ("Apple,  Cat", "apple, cat", True),
        ("owl\tfox", "owl fox", True),
        ("42", "41", False),
        ("42..", "42", False),
        ("", "42", False),
    ],
)
def test_score_answer_normalises_case_space_and_a_trailing_period(prediction, reference, expected):
    assert score_answer(prediction, reference) is expected


# --- Tokenizer --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suite_examples() -> list[dict]:
    return generate_examples(1100, seed=0)


@pytest.fixture(scope="module")
def tokenizer(suite_examples):
    return train_suite_tokenizer([format_example(example) for example in suite_examples], vocab_size=1024)


def test_tokenizer_respects_the_requested_vocab_size(tokenizer):
    assert len(tokenizer) <= 1024


def test_tokenizer_special_tokens_have_a_separate_pad(tokenizer):
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.unk_token == EOS_TOKEN
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.model_max_length == 1024


@pytest.mark.parametrize("task", sorted(TASK_FAMILIES))
def test_tokenizer_round_trips_every_family_exactly(tokenizer, task):
    for example in _examples_of(task, count=20):
        for text in (format_example(example), example["output"], " " + example["output"], example["input"]):
            assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", [" 42", "  007 ,x", "12, 37\n\n 5 ", "héllo wörld ✓", "a=3,  b=7", "\t-9"])
def test_tokenizer_round_trips_leading_spaces_digits_and_unseen_characters(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_splits_every_digit_into_its_own_token(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("x = 1234; y = x * 56 gives 69104"))
    assert all(len(token) == 1 for token in tokens if any(char.isdigit() for char in token))


def test_tokenizer_encodes_the_prompt_template_compactly(tokenizer):
    template = format_alpaca_prompt("", "")
    assert len(tokenizer.encode(template)) < len(template) / 3


def test_every_answer_is_at_most_sixteen_tokens(tokenizer, suite_examples):
    assert max(len(tokenizer.encode(example["output"])) for example in suite_examples) <= 16


def test_saved_tokenizer_reloads_offline_with_identical_encodings(tmp_path, monkeypatch, suite_examples):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = build_suite_tokenizer(tmp_path / "tok", suite_examples, vocab_size=400)
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    texts = [format_example(example) for example in suite_examples[:200]] + [" 12, 3", EOS_TOKEN]
    assert [reloaded.encode(text) for text in texts] == [saved.encode(text) for text in texts]
    assert (reloaded.pad_token, reloaded.eos_token, reloaded.model_max_length) == (PAD_TOKEN, EOS_TOKEN, 1024)
    assert len(reloaded) <= 400


@pytest.mark.parametrize(
    ("texts", "vocab_size", "argument"),
    [(["abc"], 100, "vocab_size"), ("just one string", 512, "texts")],
)
def test_bad_tokenizer_arguments_raise_value_errors(texts, vocab_size, argument):
    with pytest.raises(ValueError, match=argument):
        train_suite_tokenizer(texts, vocab_size=vocab_size)
