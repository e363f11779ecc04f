"""Instruction data: templates, schemas, loading, tokenisation with prompt masking, and collation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, HfArgumentParser, PreTrainedTokenizerFast, TrainingArguments

from distillens_trainer.data import (
    DataArguments,
    DataCollatorForCompletionOnly,
    build_datasets,
    build_prompt,
    detect_schema,
    format_alpaca_prompt,
    load_raw_dataset,
    load_raw_splits,
    to_prompt_completion,
    tokenize_prompt_completion,
)
from distillens_trainer.models.facts import IGNORE_INDEX

from conftest import DATA_DIR, GPT2_TOKENIZER_DIR, shared_path

SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

ROWS = [
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Add.", "input": "1+2", "output": "3"},
]


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def byte_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per UTF-8 byte (ids 0-255) plus <bos>=256, <eos>=257; no pad token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab.update({"<bos>": 256, "<eos>": 257})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", 256)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>")


def n_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def pairs(*rows: tuple[str, str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": [p for p, _ in rows], "completion": [c for _, c in rows]})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        lines = [line for _, line in zip(range(limit or 10**9), handle)]
    return [json.loads(line) for line in lines]


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """Keep the `datasets` Arrow cache of these tests out of the user's cache folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture(scope="module")
def gpt2():
    """The shared GPT-2 tokenizer with a small chat template: for tests marked ``needs_shared``."""
    tokenizer = AutoTokenizer.from_pretrained(shared_path(GPT2_TOKENIZER_DIR))
    tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------------------


def test_alpaca_template_is_exact_with_and_without_input():
    assert format_alpaca_prompt("Do X.", "ctx") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo X.\n\n### Input:\nctx\n\n### Response:\n"
    )
    expected_no_input = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo X.\n\n### Response:\n"
    )
    assert format_alpaca_prompt("Do X.") == expected_no_input
    assert format_alpaca_prompt("Do X.", "") == expected_no_input


@pytest.mark.needs_shared
def test_alpaca_prompts_match_minillm_reference_prompts():
    rows = read_jsonl(shared_path(DATA_DIR / "dolly" / "raw" / "minillm_valid.jsonl"), limit=50)
    assert any(row["input"] for row in rows) and any(not row["input"] for row in rows)
    for row in rows:
        assert format_alpaca_prompt(row["instruction"], row["input"]) == row["prompt"]
        assert build_prompt(row, None, "alpaca") == row["prompt"]


# ---------------------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------------------


def test_prompt_tokens_are_masked_and_response_tokens_labelled_with_eos(tok):
    tokenized, n_dropped = tokenize_prompt_completion(pairs(("abc", "xy")), tok, 32, 16)
    example = tokenized[0]
    assert n_dropped == 0
    assert set(tokenized.column_names) == {"input_ids", "attention_mask", "labels"}
    assert tok.decode(example["input_ids"]) == "abcxy<eos>"
    assert example["input_ids"][-1] == tok.eos_token_id
    assert example["labels"] == [IGNORE_INDEX] * 3 + example["input_ids"][3:]
    assert example["attention_mask"] == [1] * 6


def test_bos_is_prepended_once_when_the_tokenizer_adds_one():
    tok_bos = byte_tokenizer(add_bos=True)
    tokenized, _ = tokenize_prompt_completion(pairs(("ab", "c"), ("<bos>ab", "c")), tok_bos, 32, 16)
    for example in tokenized:
        assert tok_bos.decode(example["input_ids"]) == "<bos>abc<eos>"
        assert example["input_ids"][:2] == [256, tok_bos.convert_tokens_to_ids("a")]
        assert example["labels"][:3] == [IGNORE_INDEX] * 3


@pytest.mark.needs_shared
def test_gpt2_gets_no_bos(gpt2):
    tokenized, _ = tokenize_prompt_completion(pairs(("Hello", " world")), gpt2, 32, 16)
    assert tokenized[0]["input_ids"] == gpt2("Hello world")["input_ids"] + [gpt2.eos_token_id]


def test_long_prompts_are_dropped_and_counted(tok, caplog):
    data = pairs(("a" * 9, "x"), ("a" * 10, "x"), ("a" * 11, "x"), ("a" * 30, "x"))
    with caplog.at_level(logging.WARNING, logger="distillens_trainer.data"):
        tokenized, n_dropped = tokenize_prompt_completion(data, tok, 64, 10, "drop")
    assert n_dropped == 2
    assert [len(ids) for ids in tokenized["input_ids"]] == [9 + 2, 10 + 2]
    assert "Dropped 2 of 4" in caplog.text


def test_long_prompts_truncate_left_keeps_the_prompt_end(tok):
    tokenized, n_dropped = tokenize_prompt_completion(
        pairs(("0123456789abcdef", "x")), tok, 64, 10, "truncate_left"
    )
    assert n_dropped == 0
    assert tok.decode(tokenized[0]["input_ids"]) == "6789abcdefx<eos>"
    assert tokenized[0]["labels"][:10] == [IGNORE_INDEX] * 10


def test_truncate_left_keeps_bos_in_front():
    tok_bos = byte_tokenizer(add_bos=True)
    tokenized, _ = tokenize_prompt_completion(pairs(("0123456789", "x")), tok_bos, 64, 5, "truncate_left")
    assert tok_bos.decode(tokenized[0]["input_ids"]) == "<bos>6789x<eos>"


def test_sequences_are_cut_to_max_length_by_truncating_the_response(tok):
    tokenized, n_dropped = tokenize_prompt_completion(pairs(("p" * 6, "r" * 20), ("p" * 6, "r")), tok, 10, 8)
    long_example, short_example = tokenized
    assert n_dropped == 0
    assert tok.decode(long_example["input_ids"]) == "pppppprrrr"  # EOS cut off with the response tail
    assert long_example["labels"].count(IGNORE_INDEX) == 6
    assert tok.decode(short_example["input_ids"]) == "ppppppr<eos>"


def test_filtering_every_example_raises_with_count_and_option(tok):
    with pytest.raises(ValueError, match=r"all 2 were dropped.*--long_prompt_strategy truncate_left"):
        tokenize_prompt_completion(pairs(("a" * 20, "x"), ("b" * 20, "y")), tok, 64, 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 10, "max_prompt_length": 10}, "max_prompt_length"),
        ({"long_prompt_strategy": "truncate_right"}, "long_prompt_strategy"),
    ],
)
def test_tokenize_rejects_bad_limits(tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tokenize_prompt_completion(pairs(("a", "b")), tok, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------------------


def test_instruction_schema_uses_the_alpaca_template(tok):
    formatted = to_prompt_completion(datasets.Dataset.from_list(ROWS), tok, DataArguments())
    assert formatted.column_names == ["prompt", "completion"]
    assert formatted["prompt"] == [format_alpaca_prompt("Say hi."), format_alpaca_prompt("Add.", "1+2")]
    assert formatted["completion"] == ["hi", "3"]


def test_instruction_schema_without_input_column_and_custom_names(tok):
    rows = [{"question": "Why?", "answer": "Because."}]
    args = DataArguments(instruction_column="question", output_column="answer", prompt_template="plain")
    formatted = to_prompt_completion(datasets.Dataset.from_list(rows), tok, args)
    assert formatted[0] == {"prompt": "Why?\n", "completion": "Because."}


def test_prompt_completion_schema_plain_is_kept_verbatim_and_alpaca_wraps_it(tok):
    data = datasets.Dataset.from_list([{"prompt": "Q: 2+2?\nA:", "completion": " 4", "id": 7}])
    plain = to_prompt_completion(data, tok, DataArguments(prompt_template="plain"))
    assert plain[0] == {"prompt": "Q: 2+2?\nA:", "completion": " 4"}
    alpaca = to_prompt_completion(data, tok, DataArguments())
    assert alpaca[0]["prompt"] == format_alpaca_prompt("Q: 2+2?\nA:")


@pytest.mark.needs_shared
def test_messages_schema_uses_the_chat_template_and_last_assistant_turn(gpt2):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    data = datasets.Dataset.from_list(
        [{"messages": conversation, "instruction": "ignored", "output": "ignored"}]
    )
    formatted = to_prompt_completion(data, gpt2, DataArguments(prompt_template="chat"))
    assert formatted[0]["prompt"] == (
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello\n<|user|>\n2+2?\n<|assistant|>\n"
    )
    assert formatted[0]["completion"] == "4"
    tokenized, _ = tokenize_prompt_completion(formatted, gpt2, 128, 64)
    response = [t for t in tokenized[0]["labels"] if t != IGNORE_INDEX]
    assert gpt2.decode(response) == "4<|endoftext|>"


@pytest.mark.needs_shared
def test_instruction_schema_with_chat_template_joins_instruction_and_input(gpt2):
    formatted = to_prompt_completion(
        datasets.Dataset.from_list(ROWS), gpt2, DataArguments(prompt_template="chat")
    )
    assert formatted["prompt"] == [
        "<|user|>\nSay hi.\n<|assistant|>\n",
        "<|user|>\nAdd.\n\n1+2\n<|assistant|>\n",
    ]


def test_messages_without_chat_template_are_rendered_as_plain_text(tok):
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]
    data = datasets.Dataset.from_list([{"messages": conversation}])
    plain = to_prompt_completion(data, tok, DataArguments(prompt_template="plain"))
    assert plain[0] == {
        "prompt": "User: Hi\n\nAssistant: Hello\n\nUser: Bye\n\nAssistant: ",
        "completion": "Bye!",
    }
    alpaca = to_prompt_completion(data, tok, DataArguments())
    assert alpaca[0]["prompt"] == format_alpaca_prompt("User: Hi\n\nAssistant: Hello\n\nUser: Bye")
    single_turn = datasets.Dataset.from_list([{"messages": conversation[:2]}])
    assert to_prompt_completion(single_turn, tok, DataArguments())[0]["prompt"] == format_alpaca_prompt("Hi")


def test_chat_template_is_required_for_chat_prompts(tok):
    with pytest.raises(ValueError, match="chat_template"):
        to_prompt_completion(datasets.Dataset.from_list(ROWS), tok, DataArguments(prompt_template="chat"))


def test_conversation_without_assistant_turn_is_rejected_for_training(tok):
    data = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(ValueError, match="no assistant message"):
        to_prompt_completion(data, tok, DataArguments())


def test_missing_columns_error_names_found_columns_and_flags(tok):
    data = datasets.Dataset.from_list([{"question": "Why?", "answer": "Because."}])
    with pytest.raises(ValueError) as error:
        to_prompt_completion(data, tok, DataArguments())
    message = str(error.value)
    assert "['answer', 'question']" in message
    for flag in ("--messages_column", "--instruction_column", "--output_column", "--prompt_column"):
        assert flag in message


def test_schema_detection_order():
    assert detect_schema(["messages", "instruction", "output", "prompt", "completion"]) == "messages"
    assert detect_schema(["instruction", "output", "prompt", "completion"]) == "instruction"
    assert detect_schema(["prompt", "completion"]) == "prompt_completion"
    assert detect_schema(["instruction"], require_completion=False) == "instruction"


def test_references_list_is_kept_for_evaluation(tok):
    rows = [{"instruction": "Title?", "input": "text", "output": "A", "outputs": ["A", "B"], "task": "t1"}]
    formatted = to_prompt_completion(datasets.Dataset.from_list(rows), tok, DataArguments())
    assert sorted(formatted.column_names) == ["completion", "outputs", "prompt"]
    assert formatted[0]["outputs"] == ["A", "B"]


# ---------------------------------------------------------------------------------------------------------
# Cells that cannot be trained on: one line naming the flag, file and line
# ---------------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_list_valued_output_trains_on_its_first_reference(tmp_path, tok):
    rows = [
        {"instruction": "Name a colour.", "output": ["red", "blue"]},
        {"instruction": "Hi.", "output": "hi"},
    ]
    train, _ = load_raw_splits(DataArguments(train_file=str(_write_jsonl(tmp_path / "t.jsonl", rows))))
    formatted = to_prompt_completion(train, tok, DataArguments())
    assert formatted["completion"] == ["red", "hi"]  # not "['red', 'blue']"


@pytest.mark.parametrize(
    ("cell", "words"),
    [
        ({"output": None}, "`output` is null: give every training row a response text"),
        (
            {"output": []},
            "`output` is a JSON array",
        ),  # here datasets cannot read the file: the reader says why
        ({"output": {"text": "x"}}, "`output` is a JSON object"),
        ({"instruction": ["a", "b"]}, "`instruction` is a JSON array"),
        ({"input": 3}, "`input` is a JSON number"),
    ],
    ids=["null", "empty_list", "object", "list_instruction", "number_input"],
)
def test_a_cell_that_cannot_be_trained_on_names_its_file_and_line(tmp_path, cell, words):
    rows = [{"instruction": f"Q{i}", "input": "", "output": f"A{i}"} for i in range(4)]
    rows[2] |= cell
    path = tmp_path / "t.jsonl"
    path.write_text(
        "\n".join(json.dumps(row) for row in rows[:2]) + "\n\n" + "\n".join(map(json.dumps, rows[2:]))
    )
    with pytest.raises(ValueError) as caught:
        load_raw_splits(DataArguments(train_file=str(path)))
    assert str(caught.value).startswith(f"--train_file: {path}:4: {words}")  # line 3 is blank


def test_messages_that_are_not_a_list_of_turns_are_refused_with_their_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    cases = [
        ({"messages": "hello"}, "`messages` is a JSON string, not a list of turns"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "`messages` has no assistant turn to learn from"),
        (
            {"messages": [{"role": "user", "content": ["a"]}, good["messages"][1]]},
            '`messages` holds a turn whose "content" is not',
        ),
    ]
    for bad, words in cases:
        path = _write_jsonl(tmp_path / "m.jsonl", [good, bad])
        with pytest.raises(ValueError) as caught:
            load_raw_splits(DataArguments(validation_file=str(path)))
        assert str(caught.value).startswith(f"--validation_file: {path}:2: {words}")


def test_train_and_eval_name_a_bad_json_line_alike(tmp_path):
    from distillens_trainer.evaluation import load_eval_examples

    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(ValueError) as train_error:
        load_raw_splits(DataArguments(train_file=str(path)))
    with pytest.raises(ValueError) as eval_error:
        load_eval_examples(path)
    assert (
        str(train_error.value)
        == f"--train_file: {path}:2: invalid JSON (Expecting value); write one JSON object per line."
    )
    assert (
        str(eval_error.value)
        == f"eval_files: {path}:2: invalid JSON (Expecting value); write one JSON object per line."
    )


def test_a_line_that_is_json_but_not_an_object_is_named(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n["c", "d"]\n')
    with pytest.raises(ValueError) as caught:
        load_raw_splits(DataArguments(train_file=str(path)))
    assert str(caught.value).startswith(f"--train_file: {path}:2: a JSON array, not an object")


def test_a_folder_of_mixed_data_formats_is_refused(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    (tmp_path / "b.csv").write_text("instruction,output\nc,d\n")
    (tmp_path / "README.md").write_text("not data\n")
    with pytest.raises(
        ValueError, match=r"several formats \(\.csv, \.jsonl\), of which datasets would read one"
    ):
        load_raw_splits(DataArguments(train_file=str(tmp_path)))
    (tmp_path / "b.csv").unlink()
    train, _ = load_raw_splits(DataArguments(train_file=str(tmp_path)))
    assert train["instruction"] == ["a"]


@pytest.mark.needs_shared
def test_build_prompt_formats_generation_prompts(gpt2):
    assert build_prompt({"instruction": "Do X.", "input": "ctx"}, None, "alpaca") == format_alpaca_prompt(
        "Do X.", "ctx"
    )
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert build_prompt({"messages": conversation}, gpt2, "chat") == "<|user|>\nHi\n<|assistant|>\n"
    assert build_prompt({"messages": conversation[:1]}, gpt2, "chat") == "<|user|>\nHi\n<|assistant|>\n"
    assert build_prompt({"prompt": "raw text"}, None, "plain") == "raw text"


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files_load_in_every_supported_format(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    rows = [*ROWS, {"instruction": "Is it true?", "input": "", "output": "NA"}]
    if suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".jsonl":
        write_jsonl(path, rows)
    elif suffix == ".csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    loaded = load_raw_dataset(str(path))
    assert loaded.to_list() == rows  # CSV keeps "" and "NA" as text


def test_save_to_disk_folders_load_the_requested_split(tmp_path):
    train, valid = datasets.Dataset.from_list(ROWS), datasets.Dataset.from_list(ROWS[:1])
    datasets.DatasetDict({"train": train, "validation": valid}).save_to_disk(str(tmp_path / "dict"))
    train.save_to_disk(str(tmp_path / "single"))
    assert len(load_raw_dataset(str(tmp_path / "dict"))) == 2
    assert len(load_raw_dataset(str(tmp_path / "dict"), split="validation")) == 1
    assert load_raw_dataset(str(tmp_path / "single"), split="anything").to_list() == ROWS
    with pytest.raises(ValueError, match=r"Split 'test' not found.*train, validation"):
        load_raw_dataset(str(tmp_path / "dict"), split="test")


def test_missing_file_error_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match=r"nope\.jsonl"):
        load_raw_dataset(str(missing))
    with pytest.raises(ValueError, match=r"--train_file: no such file.*nope\.jsonl"):
        build_datasets(DataArguments(train_file=str(missing)), byte_tokenizer())


def test_unknown_extension_lists_supported_ones(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"'\.txt'.*\.csv, \.json, \.jsonl, \.parquet"):
        load_raw_dataset(str(path))


# ---------------------------------------------------------------------------------------------------------
# Arguments and build_datasets
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"prompt_template": "vicuna"}, "--prompt_template"),
        ({"long_prompt_strategy": "keep"}, "--long_prompt_strategy"),
        ({"max_length": 256, "max_prompt_length": 256}, "--max_prompt_length"),
        ({"max_train_samples": 0}, "--max_train_samples"),
        ({"preprocessing_num_workers": 0}, "--preprocessing_num_workers"),
        ({"validation_split_percentage": 100}, "--validation_split_percentage"),
        ({"train_file": "a.jsonl", "dataset_name": "x/y"}, "--dataset_name"),
        ({"dataset_config_name": "en"}, "--dataset_config_name"),
        ({"validation_file": "v.jsonl", "validation_split_percentage": 5}, "--validation_split_percentage"),
    ],
)
def test_data_arguments_reject_bad_values_naming_the_field(kwargs, field_name):
    with pytest.raises(ValueError, match=field_name):
        DataArguments(**kwargs)


def test_data_arguments_parse_next_to_training_arguments(tmp_path):
    parser = HfArgumentParser((DataArguments, TrainingArguments))
    data_args, training_args = parser.parse_args_into_dataclasses(
        [
            "--train_file",
            "t.jsonl",
            "--max_length",
            "128",
            "--max_prompt_length",
            "64",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert (data_args.train_file, data_args.max_length, data_args.prompt_template) == (
        "t.jsonl",
        128,
        "alpaca",
    )
    assert training_args.output_dir == str(tmp_path)


def test_validation_split_percentage_is_deterministic_and_disjoint(tmp_path, tok):
    rows = [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    args = DataArguments(train_file=str(path), prompt_template="plain", validation_split_percentage=10)
    train, evaluation = build_datasets(args, tok)
    _, evaluation_again = build_datasets(args, tok)
    assert (len(train), len(evaluation)) == (36, 4)
    assert evaluation["input_ids"] == evaluation_again["input_ids"]
    assert not {tuple(ids) for ids in train["input_ids"]} & {tuple(ids) for ids in evaluation["input_ids"]}


def test_build_datasets_limits_samples_and_enters_main_process_first(tmp_path, tok):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "dev": datasets.Dataset.from_list(rows[:5])}
    ).save_to_disk(str(tmp_path / "saved"))
    args = DataArguments(
        dataset_name=str(tmp_path / "saved"),
        validation_split="dev",
        prompt_template="plain",
        max_train_samples=3,
        max_eval_samples=2,
    )
    entered = []

    def main_process_first():
        entered.append(True)
        return torch.no_grad()  # any context manager

    train, evaluation = build_datasets(args, tok, main_process_first=main_process_first)
    assert entered == [True]
    assert [tok.decode(ids) for ids in train["input_ids"]] == ["p0c0<eos>", "p1c1<eos>", "p2c2<eos>"]
    assert len(evaluation) == 2


def test_build_datasets_without_eval_source_returns_no_eval_set(tmp_path, tok):
    args = DataArguments(train_file=str(write_jsonl(tmp_path / "t.jsonl", ROWS)))
    train, evaluation = build_datasets(args, tok)
    assert len(train) == 2 and evaluation is None


@pytest.mark.needs_shared
def test_dolly_test_set_end_to_end_with_gpt2(gpt2):
    path = shared_path(DATA_DIR / "dolly" / "test_500.jsonl")
    args = DataArguments(train_file=str(path), validation_split_percentage=10)
    train, evaluation = build_datasets(args, gpt2)
    assert (
        len(train) + len(evaluation) == 500 and len(evaluation) == 50
    )  # the paper's limits drop nothing here
    first_row = read_jsonl(path, limit=1)[0]
    prompt_ids = gpt2(format_alpaca_prompt(first_row["instruction"], first_row["input"]))["input_ids"]
    matching = [ex for ex in (*train, *evaluation) if ex["input_ids"][: len(prompt_ids)] == prompt_ids]
    assert matching, "the first Dolly prompt should appear verbatim"
    example = matching[0]
    assert example["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert all(label != IGNORE_INDEX for label in example["labels"][len(prompt_ids) :])
    assert max(len(ids) for ids in train["input_ids"]) <= 512
    batch = DataCollatorForCompletionOnly(gpt2)([train[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


@pytest.mark.needs_shared
def test_sinst_references_survive_formatting(gpt2):
    raw = load_raw_dataset(str(shared_path(DATA_DIR / "sinst" / "test_11_1694.jsonl")))
    formatted = to_prompt_completion(raw.select(range(50)), gpt2, DataArguments())
    assert all(row["outputs"][0] == row["completion"] for row in formatted)


# ---------------------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------------------

FEATURES = [
    {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7], "prompt": "dropped"},
    {"input_ids": [8], "attention_mask": [1], "labels": [8]},
]


def test_collator_pads_on_the_right_by_default_with_eos_as_pad(tok):
    batch = DataCollatorForCompletionOnly(tok)(FEATURES)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(tensor.dtype == torch.long for tensor in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 257, 257]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_collator_pads_on_the_left_to_a_multiple(tok):
    collator = DataCollatorForCompletionOnly(tok, pad_token_id=0, padding_side="left", pad_to_multiple_of=4)
    batch = collator(FEATURES)
    assert batch["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 8]]


def test_collator_needs_a_pad_or_eos_token():
    tokenizer = byte_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="pad_token"):
        DataCollatorForCompletionOnly(tokenizer)


# ---------------------------------------------------------------------------------------------------------
# SentencePiece-style tokenisation (Llama, Mistral): the response is cut from the joint encoding
# ---------------------------------------------------------------------------------------------------------

SP_ROWS = [
    {"prompt": format_alpaca_prompt("Name a colour."), "completion": "The sky is blue."},
    {"prompt": format_alpaca_prompt("Add.", "1 plus 2"), "completion": "The answer is three."},
    {"prompt": "Question: what is red?\n", "completion": "A colour of the sky at dusk."},
]


def sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """A small BPE with Llama's Metaspace pre-tokenizer (``▁`` word boundaries, prepended to the text), BOS added."""
    from tokenizers import trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(  # newlines stay single pieces, as Llama's <0x0A>
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    texts = [row["prompt"] + row["completion"] for row in SP_ROWS] * 3
    backend.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_sentencepiece_style_response_tokens_are_those_of_the_joint_encoding():
    tokenizer = sentencepiece_style_tokenizer()
    alone = tokenizer.convert_ids_to_tokens(tokenizer("The", add_special_tokens=False).input_ids)
    assert alone[0].startswith("▁")  # the completion encoded on its own gains a word-boundary piece
    tokenized, _ = tokenize_prompt_completion(datasets.Dataset.from_list(SP_ROWS), tokenizer)
    for row, example in zip(tokenized, SP_ROWS):
        joint = tokenizer(example["prompt"] + example["completion"], add_special_tokens=False).input_ids
        assert row["input_ids"] == [tokenizer.bos_token_id, *joint, tokenizer.eos_token_id]
        response = [token for token in row["labels"] if token != IGNORE_INDEX]
        assert response[-1] == tokenizer.eos_token_id
        assert not tokenizer.convert_ids_to_tokens(response[0]).startswith("▁")
        assert tokenizer.decode(response[:-1]) == example["completion"]
        prompt = row["input_ids"][: len(row["input_ids"]) - len(response)]
        assert prompt == [
            tokenizer.bos_token_id,
            *tokenizer(example["prompt"], add_special_tokens=False).input_ids,
        ]


def test_a_token_spanning_prompt_and_response_is_learned_as_response(tok):
    from distillens_trainer.data import split_at_prompt

    assert split_at_prompt([5, 6, 7], [5, 6, 8, 9]) == ([5, 6], [8, 9])  # 7 merged with the response into 8
    assert split_at_prompt([5, 6], [5, 6, 9]) == ([5, 6], [9])


# ---------------------------------------------------------------------------------------------------------
# Decontamination
# ---------------------------------------------------------------------------------------------------------


def test_training_rows_whose_prompt_is_in_an_eval_file_are_dropped_and_counted(tmp_path, tok, caplog):
    train = [
        {"instruction": "Name a colour.", "input": "", "output": "blue"},
        {"instruction": "Add.", "input": "1+2", "output": "3"},
        {"instruction": "Add.", "input": "2+2", "output": "4"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    evaluation = [
        {"instruction": "  name a   COLOUR.", "input": "", "output": "red"},  # same prompt up to case/space
        {"instruction": "Add.", "input": "5+5", "output": "10"},  # same instruction, other input: kept
    ]
    args = DataArguments(
        train_file=str(write_jsonl(tmp_path / "train.jsonl", train)),
        decontaminate_files=[str(write_jsonl(tmp_path / "test.jsonl", evaluation))],
    )
    stats: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="distillens_trainer.data"):
        train_set, _ = build_datasets(args, tok, stats=stats)
    assert len(train_set) == 3 and stats == {"decontaminated_train_rows": 1}
    assert "dropped 1 of 4 training rows" in caplog.text
    texts = [tok.decode(row["input_ids"]) for row in train_set]
    assert not any("Name a colour." in text for text in texts)


def test_a_missing_decontamination_file_is_named(tmp_path, tok):
    args = DataArguments(
        train_file=str(write_jsonl(tmp_path / "train.jsonl", ROWS)),
        decontaminate_files=[str(tmp_path / "nowhere.jsonl")],
    )
    with pytest.raises(ValueError, match="--decontaminate_files: no such file"):
        build_datasets(args, tok)


@pytest.mark.needs_shared
def test_minillm_dolly_train_overlaps_the_test_set_and_decontamination_removes_it(gpt2):
    files = [shared_path(DATA_DIR / "dolly" / name) for name in ("train_11435.jsonl", "test_500.jsonl")]
    args = DataArguments(
        train_file=str(files[0]), decontaminate_files=[str(files[1])], max_train_samples=None
    )
    formatted = to_prompt_completion(load_raw_dataset(str(files[0])), gpt2, args)
    from distillens_trainer.data import decontaminate

    kept, n_dropped = decontaminate(formatted, gpt2, args)
    assert 2 <= n_dropped <= 20 and len(kept) == len(formatted) - n_dropped


def test_decontamination_that_removes_every_row_is_an_error(tmp_path, tok):
    path = str(write_jsonl(tmp_path / "test.jsonl", ROWS))
    with pytest.raises(ValueError, match="removed every training row"):
        build_datasets(DataArguments(train_file=path, decontaminate_files=[path]), tok)
