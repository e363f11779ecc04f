"""Tests for the MiniLLM-protocol generation evaluation (metrics, generation, reports, Trainer callback)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser

from distillens_trainer.cli import main as cli_main
from distillens_trainer.commands.parsing import parse_command
from distillens_trainer.evaluation import (
    EvalArguments,
    GenerationSettings,
    RougeEvalCallback,
    evaluate_files,
    exact_match,
    generate_responses,
    load_eval_examples,
    normalize_answer,
    rouge_l,
    run_evaluation,
    unique_file_names,
)
from distillens_trainer.models.facts import IGNORE_INDEX, truncate_left
from distillens_trainer.models.loading import ModelArguments

from conftest import DATA_DIR, GPT2_TOKENIZER_DIR, shared_path

DOLLY_TEST = DATA_DIR / "dolly" / "test_500.jsonl"
SINST_TEST = DATA_DIR / "sinst" / "test_11_1694.jsonl"

PROMPTS = [
    "Below is an instruction. Name three primary colours.",
    "Hi",
    "Write a short poem about the sea and the wind that carries the boats home at night.",
    "What is 2 + 2?",
    "Summarise the plot of a novel in which a detective solves a case.",
    "Translate 'good morning' into French.",
]


@pytest.fixture(scope="module", autouse=True)
def _single_torch_thread():
    """The tiny models gain nothing from intra-op threads, which thrash on a busy machine; restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_path(GPT2_TOKENIZER_DIR))


def _tiny_gpt2(tokenizer) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer))
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return _tiny_gpt2(tokenizer)


def _greedy(model, tokenizer, prompts, **overrides):
    settings = {
        "batch_size": 4,
        "max_new_tokens": 8,
        "max_prompt_length": 64,
        "do_sample": False,
        "seed": 0,
        "show_progress": False,
    }
    settings.update(overrides)
    return generate_responses(model, tokenizer, prompts, **settings)


TINY_MODEL_ARGS = ModelArguments(model_name_or_path="tiny-gpt2")


def _eval_args(tmp_path: Path, files: list[Path], **overrides) -> EvalArguments:
    settings = {
        "output_dir": str(tmp_path / "eval"),
        "eval_files": [str(f) for f in files],
        "seeds": [10, 20],
    }
    settings.update(overrides)
    return EvalArguments(**settings)


def _settings(**overrides) -> GenerationSettings:
    """The tests' generation settings: the paper's protocol with short generations in batches of 4."""
    return GenerationSettings(max_new_tokens=8, batch_size=4, **overrides)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ metrics


def test_rouge_l_of_reference_against_itself_is_100():
    reference = "Virgin Australia commenced services on 31 August 2000."
    assert rouge_l(reference, [reference]) == pytest.approx(100.0)


def test_rouge_l_of_disjoint_texts_is_0():
    assert rouge_l("alpha beta gamma", ["delta epsilon"]) == 0.0


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # LCS = 3 ("the cat sat"); P = 3/3, R = 3/6, F = 2PR/(P+R) = 2/3.
        ("the cat sat", "the cat sat on the mat", 200 / 3),
        # LCS = 5 ("the cat on the mat"); P = R = 5/6.
        ("the cat sat on the mat", "the cat is on the mat", 500 / 6),
        # LCS = 2 ("red blue"); P = 2/4, R = 2/2, F = 2/3.
        ("red green blue yellow", "red blue", 200 / 3),
    ],
)
def test_rouge_l_partial_overlap_matches_hand_computed_lcs(prediction, reference, expected):
    assert rouge_l(prediction, [reference]) == pytest.approx(expected)


def test_rouge_l_stems_words_like_minillm():
    assert rouge_l("cats running", ["cat runs"]) == pytest.approx(100.0)


def test_rouge_l_takes_the_best_reference():
    references = ["delta epsilon", "the cat sat on the mat", "the cat"]
    assert rouge_l("the cat sat", references) == pytest.approx(80.0)  # vs "the cat": P=2/3, R=1


def test_metrics_reject_an_empty_reference_list():
    with pytest.raises(ValueError, match="references"):
        rouge_l("text", [])
    with pytest.raises(ValueError, match="references"):
        exact_match("text", "a bare string")


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("  Paris. ", "paris"),
        ("The   Eiffel\nTower!", "the eiffel tower"),
        ("Yes", "yes."),
        ("U.S.A.", "USA"),
    ],
)
def test_exact_match_ignores_case_whitespace_and_punctuation(prediction, reference):
    assert exact_match(prediction, [reference]) == 100.0


def test_exact_match_is_0_for_different_answers_and_max_over_references():
    assert exact_match("Paris", ["London"]) == 0.0
    assert exact_match("Paris", ["London", "paris!"]) == 100.0
    assert normalize_answer("  A, B;  c ") == "a b c"


# ------------------------------------------------------------------------------------------ arguments


def test_eval_arguments_parse_from_the_command_line_with_paper_defaults():
    parser = HfArgumentParser((ModelArguments, EvalArguments, GenerationSettings))
    model_args, args, settings = parser.parse_args_into_dataclasses(
        ["--model_name_or_path", "m", "--output_dir", "o", "--eval_files", "a.jsonl", "b.jsonl"]
    )
    assert (model_args.model_name_or_path, model_args.dtype) == ("m", "auto")
    assert args.eval_files == ["a.jsonl", "b.jsonl"]
    assert args.seeds == [10, 20, 30, 40, 50]
    assert (settings.do_sample, settings.temperature, settings.top_p, settings.top_k) == (True, 1.0, 1.0, 0)
    assert (settings.no_repeat_ngram_size, settings.max_new_tokens, settings.max_prompt_length) == (
        6,
        256,
        256,
    )
    assert settings == GenerationSettings()
    assert args.effective_seeds(settings) == [10, 20, 30, 40, 50]


def test_greedy_evaluation_runs_a_single_seed():
    args = EvalArguments(output_dir="o", eval_files=["a.jsonl"])
    assert args.effective_seeds(GenerationSettings(do_sample=False)) == [10]


def test_eval_command_line_keeps_the_generation_flags_in_their_own_group(capsys):
    argv = ["--output_dir", "o", "--eval_files", "a.jsonl", "--no_do_sample", "--top_k", "5", "--temperature"]
    argv += ["0.5", "--top_p", "0.9", "--no_repeat_ngram_size", "3", "--max_new_tokens", "7"]
    argv += ["--max_prompt_length", "32", "--batch_size", "2"]
    args, settings = parse_command((EvalArguments, GenerationSettings), argv, "distillens eval")
    assert args.eval_files == ["a.jsonl"]
    assert settings == GenerationSettings(
        do_sample=False,
        temperature=0.5,
        top_p=0.9,
        top_k=5,
        no_repeat_ngram_size=3,
        max_new_tokens=7,
        max_prompt_length=32,
        batch_size=2,
    )
    generation_fields = {item.name for item in dataclasses.fields(GenerationSettings)}
    assert not generation_fields & {item.name for item in dataclasses.fields(EvalArguments)}
    with pytest.raises(SystemExit):
        parse_command((EvalArguments, GenerationSettings), ["--help"], "distillens eval")
    usage = capsys.readouterr().out
    assert "\ngeneration:\n" in usage and "--no_do_sample" in usage
    assert usage.index("\nevaluation:\n") < usage.index("\ngeneration:\n") < usage.index("--top_k")


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("eval_files", []),
        ("seeds", []),
        ("seeds", [1, 1]),
        ("max_eval_samples", 0),
        ("temperature", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("no_repeat_ngram_size", -1),
        ("max_new_tokens", 0),
        ("max_prompt_length", 0),
        ("batch_size", 0),
        ("prompt_template", "vicuna"),
    ],
)
def test_eval_arguments_reject_invalid_values_naming_the_field(field_name, value):
    if field_name in {item.name for item in dataclasses.fields(GenerationSettings)}:
        with pytest.raises(ValueError, match=f"^{field_name}:"):
            GenerationSettings(**{field_name: value})
        return
    settings = {"output_dir": "o", "eval_files": ["a.jsonl"], field_name: value}
    with pytest.raises(ValueError, match=f"^{field_name}:"):
        EvalArguments(**settings)


def test_eval_takes_the_model_fields_from_model_arguments_and_rejects_a_bad_dtype(capsys):
    model_fields = {"model_name_or_path", "gguf_file", "tokenizer_name_or_path", "dtype"}
    assert not model_fields & {item.name for item in dataclasses.fields(EvalArguments)}
    with pytest.raises(ValueError, match=r"^dtype='int8' must be one of"):
        ModelArguments(model_name_or_path="m", dtype="int8")
    argv = ["--model_name_or_path", "m", "--eval_files", "a.jsonl", "--output_dir", "o", "--dtype", "int8"]
    assert cli_main(["eval", *argv]) == 2  # a dtype outside the choices is a usage error
    err = capsys.readouterr().err
    assert "--dtype" in err and "invalid choice" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------ data


def test_load_eval_examples_rejects_missing_file_and_fields(tmp_path):
    with pytest.raises(ValueError, match="eval_files: no such file"):
        load_eval_examples(tmp_path / "missing.jsonl")
    no_output = _write_jsonl(tmp_path / "no_output.jsonl", [{"instruction": "Say hi", "input": ""}])
    with pytest.raises(ValueError, match=re.escape("no_output.jsonl:1: missing field `output`")):
        load_eval_examples(no_output)
    no_instruction = _write_jsonl(tmp_path / "no_instruction.jsonl", [{"output": "hi"}])
    with pytest.raises(ValueError, match="missing string field `instruction`"):
        load_eval_examples(no_instruction)


def test_load_eval_examples_keeps_the_first_max_samples_rows(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    assert [row["instruction"] for row in load_eval_examples(path, 3)] == ["q0", "q1", "q2"]


def test_colliding_file_stems_get_their_folder_as_prefix():
    names = unique_file_names(["data/dolly/valid.jsonl", "data/sinst/valid.jsonl", "x/vicuna.jsonl"])
    assert names == ["dolly_valid", "sinst_valid", "vicuna"]


def test_truncate_left_keeps_the_prompt_end_and_a_leading_bos():
    assert truncate_left([1, 2, 3, 4, 5], 3) == [3, 4, 5]
    assert truncate_left([0, 2, 3, 4, 5], 3, bos_token_id=0) == [0, 4, 5]
    assert truncate_left([1, 2], 3, bos_token_id=0) == [1, 2]


# ------------------------------------------------------------------------------------------ generation


@pytest.mark.needs_shared
def test_generation_returns_one_response_per_prompt_in_the_original_order(tiny_model, tokenizer):
    responses = _greedy(tiny_model, tokenizer, PROMPTS)
    reversed_responses = _greedy(tiny_model, tokenizer, PROMPTS[::-1])
    assert len(responses) == len(PROMPTS)
    assert all(isinstance(text, str) for text in responses)
    assert reversed_responses == responses[::-1]


@pytest.mark.needs_shared
def test_greedy_generation_is_deterministic_and_batch_size_invariant(tiny_model, tokenizer):
    batched = _greedy(tiny_model, tokenizer, PROMPTS, batch_size=4)
    assert _greedy(tiny_model, tokenizer, PROMPTS, batch_size=4) == batched
    assert _greedy(tiny_model, tokenizer, PROMPTS, batch_size=1) == batched


@pytest.mark.needs_shared
def test_generation_leaves_tokenizer_and_training_mode_unchanged(tokenizer):
    model = _tiny_gpt2(tokenizer)
    assert model.config.pad_token_id is None and tokenizer.pad_token is None
    tokenizer.padding_side = "right"
    model.train()
    _greedy(model, tokenizer, PROMPTS[:3])
    assert tokenizer.padding_side == "right"
    assert tokenizer.pad_token is None
    assert model.training


@pytest.mark.needs_shared
def test_sampling_is_reproducible_per_seed_and_differs_across_seeds(tiny_model, tokenizer):
    first = _greedy(tiny_model, tokenizer, PROMPTS, do_sample=True, top_k=0, seed=10)
    again = _greedy(tiny_model, tokenizer, PROMPTS, do_sample=True, top_k=0, seed=10)
    other = _greedy(tiny_model, tokenizer, PROMPTS, do_sample=True, top_k=0, seed=20)
    assert first == again
    assert first != other


@pytest.mark.needs_shared
def test_long_prompts_are_left_truncated_to_max_prompt_length(tiny_model, tokenizer):
    ending = " and then answer the question in one sentence please"
    prompts = ["A completely different opening" + ending, "Some other start of a prompt here" + ending]
    tail_length = len(tokenizer(ending).input_ids)
    first, second = _greedy(tiny_model, tokenizer, prompts, max_prompt_length=tail_length)
    assert first == second


# ------------------------------------------------------------------------------------------ files


def _real_eval_files(tmp_path: Path) -> list[Path]:
    """4 real Dolly rows and 4 real S-NI rows copied into tmp_path."""
    files = []
    for source in (shared_path(DOLLY_TEST), shared_path(SINST_TEST)):
        lines = source.read_text(encoding="utf-8").splitlines()[:4]
        target = tmp_path / source.name
        target.write_text("\n".join(lines) + "\n", encoding="utf-8")
        files.append(target)
    return files


@pytest.mark.needs_shared
def test_evaluate_files_writes_report_and_generations(tmp_path, tiny_model, tokenizer):
    files = _real_eval_files(tmp_path)
    args = _eval_args(tmp_path, files)
    report = evaluate_files(tiny_model, tokenizer, TINY_MODEL_ARGS, args, _settings())

    output_dir = Path(args.output_dir)
    assert json.loads((output_dir / "report.json").read_text()) == report
    assert report["model"] == "tiny-gpt2"
    assert report["protocol"]["seeds"] == [10, 20]
    assert report["protocol"]["top_k"] == 0
    assert report["protocol"]["dtype"] == "auto"  # from ModelArguments
    assert [entry["name"] for entry in report["results"]] == ["test_500", "test_11_1694"]
    for entry, path in zip(report["results"], files):
        assert entry["file"] == str(path)
        assert entry["num_examples"] == 4
        for metric in ("rougeL", "exact_match"):
            block = entry[metric]
            assert set(block) == {"mean", "std", "per_seed"}
            assert len(block["per_seed"]) == 2
            assert 0.0 <= block["mean"] <= 100.0 and block["std"] >= 0.0
        lines = (output_dir / f"{entry['name']}.generations.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == 4 * 2
        assert {r["seed"] for r in records} == {10, 20}
        expected_keys = {"instruction", "input", "prompt", "references", "seed", "generation"}
        assert expected_keys | {"rougeL", "exact_match"} == set(records[0])
        assert records[0]["prompt"].endswith("### Response:\n")
    sinst_refs = [json.loads(line)["outputs"] for line in files[1].read_text().splitlines()]
    sinst_records = [json.loads(line) for line in (output_dir / "test_11_1694.generations.jsonl").open()]
    assert [r["references"] for r in sinst_records[:4]] == sinst_refs
    assert not list(output_dir.glob("*.tmp"))


@pytest.mark.needs_shared
def test_greedy_report_has_one_seed_and_zero_std(tmp_path, tiny_model, tokenizer):
    files = _real_eval_files(tmp_path)[:1]
    report = evaluate_files(
        tiny_model, tokenizer, TINY_MODEL_ARGS, _eval_args(tmp_path, files), _settings(do_sample=False)
    )
    rouge = report["results"][0]["rougeL"]
    assert len(rouge["per_seed"]) == 1 and rouge["std"] == 0.0


@pytest.mark.needs_shared
def test_existing_report_is_not_overwritten_without_the_flag(tmp_path, tiny_model, tokenizer):
    files = _real_eval_files(tmp_path)[:1]
    args = _eval_args(tmp_path, files, max_eval_samples=2)
    settings = _settings(do_sample=False)
    report_path = Path(args.output_dir) / "report.json"
    report_path.parent.mkdir(parents=True)
    report_path.write_text("{}")
    with pytest.raises(ValueError, match="overwrite_output_dir"):
        evaluate_files(tiny_model, tokenizer, TINY_MODEL_ARGS, args, settings)
    with pytest.raises(ValueError, match="overwrite_output_dir"):
        run_evaluation(
            TINY_MODEL_ARGS, args, settings
        )  # refuses before trying to load the (nonexistent) model
    assert report_path.read_text() == "{}"
    args.overwrite_output_dir = True
    evaluate_files(tiny_model, tokenizer, TINY_MODEL_ARGS, args, settings)
    assert json.loads(report_path.read_text())["results"][0]["num_examples"] == 2


@pytest.mark.needs_shared
def test_command_line_evaluation_loads_a_saved_model_and_tokenizer(tmp_path, tiny_model, tokenizer):
    files = _real_eval_files(tmp_path)[:1]
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    argv = ["--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "cli")]
    argv += [
        "--eval_files",
        str(files[0]),
        "--no_do_sample",
        "--max_eval_samples",
        "2",
        "--max_new_tokens",
        "8",
    ]
    assert cli_main(["eval", *argv]) == 0
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert report["model"] == str(model_dir)
    assert report["results"][0]["num_examples"] == 2
    assert (tmp_path / "cli" / "report.json").is_file()


# ------------------------------------------------------------------------------------------ callback


class _TokenizedRows(torch.utils.data.Dataset):
    """Fixed-length causal-LM rows built from real Dolly examples."""

    def __init__(self, tokenizer, examples, length=32):
        self.rows = []
        for example in examples:
            ids = tokenizer(example["instruction"] + "\n" + example["output"]).input_ids[:length]
            pad = length - len(ids)
            self.rows.append(
                {
                    "input_ids": torch.tensor(ids + [tokenizer.eos_token_id] * pad),
                    "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
                    "labels": torch.tensor(ids + [IGNORE_INDEX] * pad),
                }
            )

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


@pytest.mark.needs_shared
def test_rouge_callback_drives_best_checkpoint_selection_in_trainer(tmp_path, tokenizer):
    from transformers import Trainer, TrainingArguments

    examples = load_eval_examples(shared_path(DOLLY_TEST), 12)
    callback = RougeEvalCallback(tokenizer, examples[8:], num_samples=3, max_new_tokens=8, batch_size=4)
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        metric_for_best_model="eval_rougeL",
        load_best_model_at_end=True,
        report_to="none",
        use_cpu=True,
        learning_rate=1e-3,
    )
    trainer = Trainer(
        model=_tiny_gpt2(tokenizer),
        args=training_args,
        train_dataset=_TokenizedRows(tokenizer, examples[:8]),
        eval_dataset=_TokenizedRows(tokenizer, examples[8:]),
        callbacks=[callback],
    )
    trainer.train()

    eval_logs = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(eval_logs) == 2
    assert all("eval_rougeL" in entry and "eval_exact_match" in entry for entry in eval_logs)
    assert trainer.state.best_metric == max(entry["eval_rougeL"] for entry in eval_logs)
    assert trainer.state.best_model_checkpoint is not None

    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_rougeL"] <= 100.0
    assert "eval_exact_match" in metrics


@pytest.mark.needs_shared
def test_rouge_callback_reads_a_jsonl_path_and_limits_samples(tokenizer):
    callback = RougeEvalCallback(tokenizer, shared_path(SINST_TEST), num_samples=5)
    assert len(callback.prompts) == 5
    assert callback.references[0] == json.loads(SINST_TEST.open().readline())["outputs"]


# ------------------------------------------------------------------------------------------ protocol and context


@pytest.mark.needs_shared
def test_a_checkpoints_generation_config_adds_nothing_to_the_protocol(tokenizer):
    prompts = ["Name three colours.", "What is the capital of France? Answer briefly."]
    settings = {"do_sample": True, "max_new_tokens": 8, "seed": 3}
    clean = _greedy(_tiny_gpt2(tokenizer), tokenizer, prompts, **settings)
    model = _tiny_gpt2(tokenizer)
    model.generation_config.update(min_new_tokens=6, min_p=0.5, typical_p=0.2, suppress_tokens=[13, 198])
    saved = model.generation_config.to_dict()
    assert _greedy(model, tokenizer, prompts, **settings) == clean
    assert model.generation_config.to_dict() == saved  # the model's own config is put back


@pytest.mark.needs_shared
def test_a_prompt_and_new_tokens_beyond_the_context_stop_before_generating(tokenizer):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=len(tokenizer))
    )
    with pytest.raises(ValueError, match="exceeds the model's context of 32 positions"):
        _greedy(model, tokenizer, ["word " * 30], max_prompt_length=64, max_new_tokens=8)
    assert len(_greedy(model, tokenizer, ["word " * 30], max_prompt_length=24, max_new_tokens=8)) == 1


# ------------------------------------------------------------------------------------ generation settings


def test_generation_settings_default_to_the_paper_protocol_and_check_their_fields():
    settings = GenerationSettings()
    assert (settings.do_sample, settings.temperature, settings.top_p, settings.top_k) == (True, 1.0, 1.0, 0)
    assert (settings.no_repeat_ngram_size, settings.max_new_tokens, settings.max_prompt_length) == (
        6,
        256,
        256,
    )
    with pytest.raises(
        ValueError, match=r"^temperature: must be > 0; fix the value passed for --temperature$"
    ):
        GenerationSettings(temperature=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        settings.with_overrides(batch_size=0)
    with pytest.raises(TypeError):
        settings.with_overrides(beams=4)


@pytest.mark.needs_shared
def test_eval_arguments_and_the_callback_hold_one_generation_settings_object(tmp_path, tokenizer):
    argv = ["--output_dir", str(tmp_path), "--eval_files", "a.jsonl", "--top_k", "5", "--max_new_tokens", "7"]
    _, settings = parse_command((EvalArguments, GenerationSettings), argv, "distillens eval")
    assert settings == GenerationSettings(top_k=5, max_new_tokens=7)
    assert dataclasses.asdict(settings) == dataclasses.asdict(GenerationSettings(top_k=5, max_new_tokens=7))
    example = {"instruction": "Say hi.", "output": "hi"}
    callback = RougeEvalCallback(tokenizer, [example], max_new_tokens=8)
    assert callback.settings == GenerationSettings(do_sample=False, max_new_tokens=8)
