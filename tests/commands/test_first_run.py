"""What a new user meets first: the help, the one-line errors, the recorded prompt format, the final output
lines and a quiet start."""

from __future__ import annotations

import configparser
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset

from distillens_trainer import DistillLensConfig, DistillLensTrainer
from distillens_trainer.cli import main
from distillens_trainer.commands.parsing import given_fields
from distillens_trainer.commands.train import (
    check_reporting_integrations,
    output_summary,
)
from distillens_trainer.distributed.quiet import (
    DEEPSPEED_LOGGER,
    DropDeepSpeedCpuNotice,
    hide_deepspeed_cpu_notice,
)
from distillens_trainer.evaluation import EvalArguments
from distillens_trainer.evaluation import output_summary as eval_summary
from distillens_trainer.models.info import (
    MODEL_INFO_NAME,
    choose_prompt_template,
    recorded_prompt_template,
    write_model_info,
)

from conftest import tiny_llama

REPO = Path(__file__).resolve().parents[2]


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


# --------------------------------------------------------------------------------------- help
def test_train_help_shows_the_distillation_fields_first_in_their_own_group(capsys):
    lines = _help("train", capsys).splitlines()
    titles = [line for line in lines if line and not line.startswith(" ") and line.endswith(":")]
    assert titles[0] == "options:" and titles[1].startswith("distillation")
    assert titles[-1] == "training (transformers.TrainingArguments):"
    text = "\n".join(lines)
    distillation = text.index(titles[1])
    for flag in ("--teacher_model_name_or_path", "--kd_weight", "--lens_weight", "--lens_num_layers"):
        assert distillation < text.index(flag) < text.index("model (the student, for train and lens):"), flag
    assert text.index("--learning_rate") > text.index(titles[-1])
    assert len(lines[0]) < 80  # the usage line is one short line, not every flag


def test_negative_flags_have_their_own_help_and_the_teacher_help_speaks_of_folders(capsys):
    text = " ".join(_help("train", capsys).split())
    assert "--no_lens_final_norm, --no-lens-final-norm Set --lens_final_norm to false." in text
    teacher_help = text[text.index("--teacher_model_name_or_path") : text.index("--teacher_dtype")]
    assert "object" not in teacher_help and "--ce_weight 1" in teacher_help


def test_given_fields_reads_flags_negative_flags_and_config_files(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("prompt_template: plain\nlearning_rate: 1.0e-3\n")
    assert given_fields([str(recipe), "--no_dataloader_pin_memory", "--kd-weight", "1"]) == {
        "prompt_template",
        "learning_rate",
        "dataloader_pin_memory",
        "kd_weight",
    }


# --------------------------------------------------------------------------------------- quiet start
def test_importing_the_package_and_asking_for_help_does_not_import_deepspeed():
    code = (
        "import sys\nfrom distillens_trainer.cli import main\nimport distillens_demo\n"
        "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('DEEPSPEED' if 'deepspeed' in sys.modules else 'NO DEEPSPEED', file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "NO DEEPSPEED"
    assert "Setting accelerator" not in done.stderr


def test_a_run_without_deepspeed_hides_its_cpu_notice_and_leaves_its_accelerator_alone(monkeypatch, capsys):
    for name in ("DS_ACCELERATOR", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    deepspeed_logger = logging.getLogger(DEEPSPEED_LOGGER)
    monkeypatch.setattr(deepspeed_logger, "filters", [])

    def hidden() -> bool:
        return any(isinstance(item, DropDeepSpeedCpuNotice) for item in deepspeed_logger.filters)

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert hidden()
    with pytest.raises(SystemExit):
        main(["train", "--deepspeed", "ds.json", "--help"])  # a DeepSpeed run shows it
    assert not hidden()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate launch with a DeepSpeed config
    hide_deepspeed_cpu_notice()
    assert not hidden()
    # DeepSpeed picks its accelerator itself: DS_ACCELERATOR stays the user's to set
    assert "DS_ACCELERATOR" not in os.environ
    capsys.readouterr()


def _on_device(monkeypatch, device: str) -> None:
    monkeypatch.setattr(DistillLensConfig, "device", property(lambda self: torch.device(device)))


@pytest.mark.parametrize(("device", "pinned"), [("cpu", False), ("cuda", True)])
def test_pin_memory_is_turned_off_on_the_cpu_only(monkeypatch, tmp_path, device, pinned):
    _on_device(monkeypatch, device)
    args = DistillLensConfig(output_dir=str(tmp_path), report_to="none")
    assert args.dataloader_pin_memory is pinned
    asked = DistillLensConfig(output_dir=str(tmp_path), report_to="none", dataloader_pin_memory=True)
    assert asked.dataloader_pin_memory is pinned  # on the CPU pinning does nothing but warn


def test_training_on_the_cpu_gives_no_pin_memory_warning(tmp_path):
    args = DistillLensConfig(
        output_dir=str(tmp_path), report_to="none", max_steps=1, per_device_train_batch_size=2, ce_weight=1.0,
        kd_weight=0.0, lens_weight=0.0, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    assert args.device.type == "cpu"  # this test is about a machine without an accelerator (as CI's)
    rows = [{"input_ids": [3, 4, 5, 6], "attention_mask": [1] * 4, "labels": [-100, -100, 5, 6]}] * 4
    trainer = DistillLensTrainer(
        model=tiny_llama(num_layers=2), args=args, train_dataset=Dataset.from_list(rows)
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*pin_memory")
        trainer.train()


# --------------------------------------------------------------------------------------- one-line errors
def test_a_missing_reporting_package_is_one_line_naming_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: [])
    with pytest.raises(ValueError, match="pip install tensorboard"):
        check_reporting_integrations(["tensorboard"])
    check_reporting_integrations(["none"])
    code = main(
        ["train", "--model_name_or_path", "s", "--output_dir", str(tmp_path / "run"), "--use_cpu", "true",
         "--report_to", "tensorboard"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "report_to='tensorboard' needs the tensorboard package" in err and "--report_to none" in err
    assert not (tmp_path / "run").exists()


def test_the_error_for_another_trainingarguments_suggests_a_conversion_that_works(tmp_path):
    trl = pytest.importorskip("trl")
    sft_config = trl.SFTConfig(
        output_dir=str(tmp_path), learning_rate=1e-4, max_length=64, logging_steps=7, report_to="none",
        use_cpu=True, lr_scheduler_type="cosine",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"DistillLensConfig\.from_training_arguments\(args") as error:
        DistillLensTrainer(model=tiny_llama(num_layers=2), args=sft_config, teacher_model=tiny_llama())
    assert "DistillLensConfig(**" not in str(error.value)
    config = DistillLensConfig.from_training_arguments(sft_config, kd_weight=0.5, lens_num_layers=1)
    assert isinstance(config, DistillLensConfig) and config.kd_weight == 0.5
    assert (config.learning_rate, config.logging_steps, config.lr_scheduler_type) == (1e-4, 7, "cosine")
    trainer = DistillLensTrainer(model=tiny_llama(num_layers=2), args=config, teacher_model=tiny_llama())
    assert trainer.layer_map == [(1, 2)]


def test_from_training_arguments_keeps_a_distillens_configs_own_fields(tmp_path):
    config = DistillLensConfig(output_dir=str(tmp_path), kd_divergence="fkl", use_cpu=True, report_to="none")
    copied = DistillLensConfig.from_training_arguments(config, lens_weight=2.0)
    assert copied.kd_divergence == "fkl" and copied.lens_weight == 2.0
    with pytest.raises(ValueError, match="not a TrainingArguments"):
        DistillLensConfig.from_training_arguments({"output_dir": "x"})


# --------------------------------------------------------------------------------------- prompt format
def test_the_prompt_format_is_recorded_and_read_back(tmp_path):
    write_model_info(tmp_path, prompt_template="plain")
    assert json.loads((tmp_path / MODEL_INFO_NAME).read_text())["prompt_template"] == "plain"
    assert recorded_prompt_template(tmp_path) == "plain"
    assert recorded_prompt_template(tmp_path / "absent") is None
    assert recorded_prompt_template("openai-community/gpt2") is None
    (tmp_path / MODEL_INFO_NAME).write_text("{not json")
    assert recorded_prompt_template(tmp_path) is None


def test_the_recorded_prompt_format_is_the_default_and_a_flag_wins_with_a_warning(tmp_path, caplog):
    plain, chat, bare = tmp_path / "plain", tmp_path / "chat", tmp_path / "bare"
    write_model_info(plain, prompt_template="plain")
    write_model_info(chat, prompt_template="chat")
    bare.mkdir()
    assert choose_prompt_template(None, [("teacher", None), ("student", str(bare))]) == "alpaca"
    assert choose_prompt_template(None, [("teacher", str(plain)), ("student", str(bare))]) == "plain"
    with caplog.at_level(logging.WARNING, logger="distillens_trainer"):
        assert choose_prompt_template("alpaca", [("teacher", str(plain))]) == "alpaca"
    assert "--prompt_template plain" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distillens_trainer"):
        assert choose_prompt_template(None, [("teacher", str(plain)), ("student", str(chat))]) == "plain"
    assert "trained on 'chat' prompts" in caplog.text


def test_train_uses_the_recorded_prompt_format_unless_the_flag_is_given(monkeypatch, tmp_path):
    write_model_info(tmp_path / "teacher", prompt_template="plain")
    seen = []
    monkeypatch.setattr(
        "distillens_trainer.commands.train.run_training",
        lambda model_args, data_args, training_args, **kwargs: seen.append(data_args.prompt_template),
    )
    monkeypatch.setattr("distillens_trainer.commands.train.output_summary", lambda *args, **kwargs: "done")
    argv = ["train", "--model_name_or_path", "s", "--output_dir", str(tmp_path / "run"), "--use_cpu", "true",
            "--teacher_model_name_or_path", str(tmp_path / "teacher")]  # fmt: skip
    assert main(argv) == 0 and main([*argv, "--prompt_template", "alpaca"]) == 0
    assert main([*argv, "--kd_weight", "0", "--lens_weight", "0", "--ce_weight", "1"]) == 0  # SFT: no teacher
    assert seen == ["plain", "alpaca", "alpaca"]


# --------------------------------------------------------------------------------------- final lines
def test_train_and_eval_end_with_where_their_output_went(tmp_path):
    args = DistillLensConfig(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none")
    line = output_summary(args, "plain")
    assert f"model and tokenizer in {tmp_path / 'run'} (prompt format 'plain'" in line
    assert "checkpoint-*" in line and "all_results.json" in line
    args = DistillLensConfig(output_dir=None, use_cpu=True, report_to="none", save_strategy="no")
    line = output_summary(args, "alpaca", output_dir_given=False)
    assert "no checkpoints" in line and f"output went to {os.path.abspath('trainer_output')}" in line
    eval_args = EvalArguments(output_dir=str(tmp_path), eval_files=["a.jsonl", "b.jsonl"])
    report = {"results": [{"name": "a"}, {"name": "b"}]}
    assert eval_summary(eval_args, report) == (
        f"distillens eval: report in {tmp_path / 'report.json'}, generations in {tmp_path}/{{a,b}}.generations.jsonl "
        "(prompt format 'alpaca')."
    )


# --------------------------------------------------------------------------------------- packaging
def test_the_notebook_extra_installs_a_notebook_front_end():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    extras = setup["options.extras_require"]
    for extra in ("notebook", "dev"):
        requirements = extras[extra].split()
        assert any(item.startswith(("jupyterlab", "notebook>")) for item in requirements), extra
