"""One layer map and one prompt format per run: a teacher cache's layer map is adopted by ``train``, and a teacher
and the student cut from it are scored in the same prompt format (issue 34)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import transformers

from distillens_trainer.cli import main
from distillens_trainer.models.info import (
    MODEL_INFO_NAME,
    choose_prompt_template,
    decided_prompt_template,
)
from distillens_trainer.teacher.cache.format import MANIFEST_NAME

from conftest import DATA_DIR, GPT2_TOKENIZER_DIR, shared_path

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _teacher(folder: Path, chat_template: str | None) -> Path:
    """A 6-block GPT-2 teacher with the shared GPT-2 tokenizer (a chat template when given), no distillens.json."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(shared_path(GPT2_TOKENIZER_DIR)))
    tokenizer.chat_template = chat_template
    transformers.set_seed(0)
    config = transformers.GPT2Config(
        n_layer=6, n_embd=32, n_head=2, n_positions=256, vocab_size=len(tokenizer)
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _shrink(capsys, teacher: Path, student: Path, num_layers: int) -> None:
    code, _, err = _cli(
        capsys, "shrink", "--model_name_or_path", str(teacher), "--num_layers", str(num_layers),
        "--output_dir", str(student),
    )  # fmt: skip
    assert code == 0, err


DATA = [
    "--train_file", "{dolly}", "--max_train_samples", "16", "--max_length", "64", "--max_prompt_length", "48",
    "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true",
]  # fmt: skip


def _data_flags() -> list[str]:
    dolly = str(shared_path(DATA_DIR / "dolly" / "dev_1000.jsonl"))
    return [flag.replace("{dolly}", dolly) for flag in DATA]


@pytest.mark.needs_shared
def test_train_adopts_the_shrunk_layer_map_of_a_teacher_cache_and_names_both_maps_on_a_conflict(
    tmp_path, capsys
):
    teacher, student, cache = _teacher(tmp_path / "teacher", None), tmp_path / "student", tmp_path / "cache"
    _shrink(capsys, teacher, student, 3)  # blocks [0, 3, 5] of 6
    code, _, err = _cli(
        capsys, "cache-teacher", "--teacher_model_name_or_path", str(teacher), "--model_name_or_path",
        str(student), "--output_dir", str(cache), "--lens_layer_map", "shrunk", *_data_flags(),
    )  # fmt: skip
    assert code == 0, err
    cached_map = json.loads((cache / MANIFEST_NAME).read_text())["settings"]["layer_map"]
    assert cached_map == [[1, 1], [2, 4]]  # 3 blocks: 2 pairs (not the paper's 5), from the blocks kept
    train = [
        "train", "--model_name_or_path", str(student), "--teacher_cache", str(cache), "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--save_strategy", "no", "--logging_steps", "1", *_data_flags(),
    ]  # fmt: skip
    code, out, err = _cli(capsys, *train, "--output_dir", str(tmp_path / "run"))
    assert code == 0, err  # no --lens_layer_map: the cache's map is the run's
    (line,) = [line for line in out.splitlines() if "as the teacher cache" in line]
    assert "the layer map [(1, 1), (2, 4)] it was made for" in line
    record = json.loads((tmp_path / "run" / "distillens_config.json").read_text())["training"]
    assert (record["lens_student_layers"], record["lens_teacher_layers"]) == ([1, 2], [1, 4])
    log_history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    assert any("lens_loss" in entry for entry in log_history)
    # The explicit choice the cache was made for is accepted; another one is one line naming both maps.
    code, _, err = _cli(capsys, *train, "--lens_layer_map", "shrunk", "--output_dir", str(tmp_path / "same"))
    assert code == 0, err
    code, _, err = _cli(capsys, *train, "--lens_layer_map", "paper", "--output_dir", str(tmp_path / "other"))
    assert code == 1
    (error,) = err.strip().splitlines()
    assert "the layer map [(1, 2), (2, 4)] reads teacher layers [2]" in error
    assert "made for the layer map [(1, 1), (2, 4)]" in error and "drop --lens_layer_map" in error
    assert not (tmp_path / "other").exists()


@pytest.mark.needs_shared
@pytest.mark.parametrize(("chat_template", "expected"), [(CHAT_TEMPLATE, "chat"), (None, "alpaca")])
def test_a_teacher_without_a_record_and_a_student_cut_from_it_are_scored_in_one_format(
    tmp_path, capsys, chat_template, expected
):
    teacher = _teacher(tmp_path / "teacher", chat_template)
    student = tmp_path / "student"
    _shrink(capsys, teacher, student, 2)
    assert not (teacher / MODEL_INFO_NAME).exists()
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"instruction": "Name a colour.", "output": "red"}) + "\n")
    formats = {}
    for name, model in (("teacher", teacher), ("student", student)):
        code, out, err = _cli(
            capsys, "eval", "--model_name_or_path", str(model), "--eval_files", str(eval_file), "--output_dir",
            str(tmp_path / f"eval_{name}"), "--seeds", "1", "--max_new_tokens", "2", "--max_prompt_length", "64",
        )  # fmt: skip
        assert code == 0, err
        report = json.loads((tmp_path / f"eval_{name}" / "report.json").read_text())
        formats[name] = report["protocol"]["prompt_template"]
        assert f"(prompt format {expected!r})" in out
    assert formats == {"teacher": expected, "student": expected}
    # lens, of a teacher with no record against itself, follows the same rule (the tokenizer's chat template)
    code, out, err = _cli(
        capsys, "lens", "--model_name_or_path", str(teacher), "--teacher_model_name_or_path", str(teacher),
        "--data_file", str(eval_file), "--output_dir", str(tmp_path / "lens"), "--max_tokens", "8",
        "--max_length", "64", "--max_prompt_length", "48",
    )  # fmt: skip
    assert code == 0, err
    assert (
        json.loads((tmp_path / "lens" / "lens.json").read_text())["settings"]["prompt_template"] == expected
    )


def test_the_default_prompt_format_rule_is_flag_then_record_then_chat_template(tmp_path, caplog):
    chat, plain = type("Chat", (), {"chat_template": "x"})(), type("Plain", (), {"chat_template": None})()
    loads = []

    def load():
        loads.append(1)
        return chat

    (tmp_path / "recorded").mkdir()
    (tmp_path / "recorded" / MODEL_INFO_NAME).write_text(json.dumps({"prompt_template": "plain"}))
    recorded, bare = str(tmp_path / "recorded"), str(tmp_path / "bare")
    with caplog.at_level(logging.INFO, logger="distillens_trainer"):
        assert choose_prompt_template(None, [("model", bare)], tokenizer=chat) == "chat"
    assert "no distillens.json records one, and the tokenizer has a chat template" in caplog.text
    assert choose_prompt_template(None, [("model", bare)], tokenizer=plain) == "alpaca"
    assert choose_prompt_template(None, [("model", bare)]) == "alpaca"  # no tokenizer known
    assert choose_prompt_template(None, [("model", recorded)], load_tokenizer=load) == "plain"
    assert choose_prompt_template("alpaca", [("model", bare)], load_tokenizer=load) == "alpaca"
    assert not loads  # the tokenizer is loaded only when neither a flag nor a record decides
    assert choose_prompt_template(None, [("model", bare)], load_tokenizer=load) == "chat" and loads == [1]
    # What the commands decide before any tokenizer loads: a flag or a record, else nothing yet.
    assert decided_prompt_template(None, [("teacher", bare), ("student", recorded)]) == "plain"
    assert decided_prompt_template("chat", [("model", bare)]) == "chat"
    assert decided_prompt_template(None, [("model", bare), ("student", None)]) is None
