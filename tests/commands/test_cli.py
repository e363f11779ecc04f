"""The ``distillens`` command line: config files, overrides, errors, recipes, and the train -> eval workflow."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import transformers

from distillens_trainer.cli import main
from distillens_trainer.commands.parsing import parse_command
from distillens_trainer.commands.train import RESOLVED_CONFIG_NAME, TRAIN_ARGUMENTS
from distillens_trainer.config import DistillLensConfig
from distillens_trainer.loss.layer_map import resolve_layer_map
from distillens_trainer.models.loading import ModelArguments

from conftest import DATA_DIR, shared_path

RECIPES = sorted((Path(__file__).resolve().parents[2] / "examples" / "recipes").glob("*.yaml"))


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


# --------------------------------------------------------------------------------------- parsing
def test_config_file_values_are_overridden_by_flags(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model_name_or_path: s\noutput_dir: out\nlearning_rate: 1.0e-3\nlens_student_layers: [2, 4]\n"
        "lens_teacher_layers: [8, 16]\nlens_final_norm: false\nuse_cpu: true\n"
    )
    model_args, _, _, config, _ = parse_command(
        TRAIN_ARGUMENTS, [str(recipe), "--learning_rate", "1e-4"], "distillens train"
    )
    assert model_args.model_name_or_path == "s"
    assert config.learning_rate == 1e-4
    assert config.lens_student_layers == [2, 4] and config.lens_teacher_layers == [8, 16]
    assert config.lens_final_norm is False


def test_json_config_files_work_too(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(
        json.dumps({"model_name_or_path": "s", "output_dir": "o", "kd_divergence": "skl", "use_cpu": True})
    )
    config = parse_command(TRAIN_ARGUMENTS, [str(recipe)], "distillens train")[3]
    assert config.kd_divergence == "skl"


def test_the_deprecated_lens_chunk_flags_still_parse_and_warn(tmp_path):
    # A recipe written for an older version (the old names), then an old flag on the command line.
    recipe = tmp_path / "old_recipe.yaml"
    recipe.write_text(
        "model_name_or_path: s\noutput_dir: o\nuse_cpu: true\nlens_chunk_size: 256\nlens_compile: true\n"
    )
    with pytest.warns(FutureWarning, match="use head_chunk_size") as caught:
        config = parse_command(TRAIN_ARGUMENTS, [str(recipe)], "distillens train")[3]
    assert any("use head_compile" in str(warning.message) for warning in caught)
    assert config.head_chunk_size == "256" and config.head_chunk_tokens == 256 and config.head_compile is True
    with pytest.warns(FutureWarning, match="lens_chunk_size"):
        argv = [
            "--model_name_or_path",
            "s",
            "--output_dir",
            "o",
            "--use_cpu",
            "true",
            "--lens-chunk-size",
            "0",
        ]
        assert parse_command(TRAIN_ARGUMENTS, argv, "distillens train")[3].head_chunk_tokens == 0


def test_the_head_flags_say_they_govern_every_terms_fused_head(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "for every term that reads logits (the output KD and CE terms and each lens pair)" in text
    assert "of every term's fused LM head (output and lens)" in text
    assert "Deprecated: use --head_chunk_size" in text and "Deprecated: use --head_compile" in text


def test_help_lists_every_distillens_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    own_fields = {f.name for f in dataclasses.fields(DistillLensConfig)} - {
        f.name for f in dataclasses.fields(transformers.TrainingArguments)
    }
    data_and_model_fields = {
        f.name for cls in TRAIN_ARGUMENTS if cls is not DistillLensConfig for f in dataclasses.fields(cls)
    }
    for name in sorted(own_fields | data_and_model_fields):
        assert f"--{name}" in text, name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "missing.yaml"], "does not exist"),
        (["train", "notes.txt"], "not a config file"),
        (
            ["train", "--model_name_or_path", "s", "--output_dir", "o", "--bogus", "1"],
            "unknown arguments: --bogus",
        ),
        (
            ["train", "--model_name_or_path", "s", "--output_dir", "o", "--kd_divergence", "foo"],
            "invalid choice",
        ),
        (["frobnicate"], "unknown command"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(capsys, argv, message):
    code, err = _run(capsys, *argv)
    assert code == 2
    assert message in err and len(err.splitlines()) == 1


def test_an_unreadable_config_file_is_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("learning_rate: [1e-4\n")
    code, err = _run(capsys, "train", str(broken))
    assert code == 2 and "could not be read" in err and len(err.splitlines()) == 1


def test_invalid_values_are_one_line_naming_the_field(capsys, tmp_path):
    code, err = _run(
        capsys, "train", "--model_name_or_path", "s", "--output_dir", str(tmp_path), "--temperature", "0",
        "--use_cpu", "true",
    )  # fmt: skip
    assert code == 1 and "temperature" in err and len(err.splitlines()) == 1


def test_a_non_empty_output_dir_is_refused_and_left_untouched(tmp_path, capsys):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("precious")
    code, err = _run(
        capsys, "train", "--model_name_or_path", "s", "--train_file", "x.jsonl", "--output_dir", str(output_dir),
        "--use_cpu", "true",
    )  # fmt: skip
    assert code == 1 and "--overwrite_output_dir" in err
    assert [p.name for p in output_dir.iterdir()] == ["keep.txt"]
    assert (output_dir / "keep.txt").read_text() == "precious"


# --------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe", RECIPES, ids=[recipe.stem for recipe in RECIPES])
def test_each_recipe_parses_and_validates(recipe):
    model_args, _, data_args, config, _ = parse_command(
        TRAIN_ARGUMENTS, [str(recipe), "--use_cpu", "true"], "distillens train"
    )
    assert model_args.model_name_or_path and config.output_dir.startswith("runs/")
    assert data_args.max_length == 512 and data_args.max_prompt_length == 256
    if config.lens_weight > 0:  # explicit maps equal the paper's automatic mapping for these depths
        depths = {"gpt2-base": (12, 48), "gpt2-medium": (24, 48), "tinyllama": (22, 32)}
        student, teacher = next(value for key, value in depths.items() if recipe.stem.startswith(key))
        assert resolve_layer_map(
            student, teacher, config.lens_student_layers, config.lens_teacher_layers
        ) == (resolve_layer_map(student, teacher))


@pytest.mark.parametrize("recipe", RECIPES, ids=[recipe.stem for recipe in RECIPES])
def test_each_recipe_trains_on_minillm_train_validates_on_dev_and_drops_test_prompts(recipe):
    _, _, data_args, config, _ = parse_command(
        TRAIN_ARGUMENTS, [str(recipe), "--use_cpu", "true"], "distillens train"
    )
    assert data_args.dataset_name is None and data_args.validation_split_percentage == 0
    assert data_args.train_file == "data/dolly/train_11435.jsonl"
    assert data_args.validation_file == "data/dolly/dev_1000.jsonl"
    assert data_args.decontaminate_files == ["data/dolly/test_500.jsonl"]
    text = recipe.read_text()
    assert "paper defaults" not in text.lower()
    if config.lens_weight > 0:  # the lens norm is stated, with how to match the official code
        assert "lens_final_norm: true" in text and "--lens_final_norm false" in text


@pytest.mark.needs_shared
def test_recipe_data_files_are_minillms_dolly_splits():
    sizes = {"train_11435.jsonl": 11435, "dev_1000.jsonl": 1000, "test_500.jsonl": 500}
    for name, rows in sizes.items():
        path = shared_path(DATA_DIR / "dolly" / name)
        assert sum(1 for line in path.open(encoding="utf-8") if line.strip()) == rows


def test_recipes_cover_the_papers_runs_and_baselines():
    names = {recipe.stem for recipe in RECIPES}
    assert {
        "gpt2-xl-teacher-sft",
        "gpt2-base-distillens",
        "gpt2-medium-distillens",
        "tinyllama-distillens",
    } <= names
    assert {"gpt2-base-kd", "gpt2-base-sft", "tinyllama-kd"} <= names


# --------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.needs_shared
def test_sft_then_distil_then_evaluate_from_the_command_line(gpt2_cli_models, tmp_path, capsys):
    common = [
        "--train_file", str(shared_path(DATA_DIR / "dolly" / "dev_1000.jsonl")), "--max_train_samples", "16",
        "--max_length", "64", "--max_prompt_length", "48", "--per_device_train_batch_size", "4",
        "--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true", "--save_strategy", "no",
    ]  # fmt: skip
    teacher_dir, student_dir, eval_dir = tmp_path / "teacher", tmp_path / "student", tmp_path / "eval"
    code, err = _run(
        capsys, "train", "--model_name_or_path", str(gpt2_cli_models / "teacher"), "--output_dir", str(teacher_dir),
        "--ce_weight", "1", "--kd_weight", "0", "--lens_weight", "0", *common,
    )  # fmt: skip
    assert code == 0, err
    code, err = _run(
        capsys, "train", "--model_name_or_path", str(gpt2_cli_models / "student"),
        "--teacher_model_name_or_path", str(teacher_dir), "--output_dir", str(student_dir),
        "--lens_num_layers", "1", *common,
    )  # fmt: skip
    assert code == 0, err
    resolved = json.loads((student_dir / RESOLVED_CONFIG_NAME).read_text())
    assert resolved["training"]["teacher_model_name_or_path"] == str(teacher_dir)
    log_history = json.loads((student_dir / "trainer_state.json").read_text())["log_history"]
    assert any("lens_loss" in entry for entry in log_history)
    student = transformers.AutoModelForCausalLM.from_pretrained(student_dir)
    assert student.config.n_layer == 2

    eval_names = ("dolly/test_500.jsonl", "sinst/test_11_1694.jsonl")
    eval_files = [str(shared_path(DATA_DIR / name)) for name in eval_names]
    code, err = _run(
        capsys, "eval", "--model_name_or_path", str(student_dir), "--eval_files", *eval_files,
        "--output_dir", str(eval_dir), "--max_eval_samples", "3", "--seeds", "10", "20", "--max_new_tokens", "8",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((eval_dir / "report.json").read_text())
    assert [result["name"] for result in report["results"]] == ["test_500", "test_11_1694"]
    for result in report["results"]:
        assert result["num_examples"] == 3
        assert set(result["rougeL"]) >= {"mean", "std"} and 0 <= result["rougeL"]["mean"] <= 100
        assert "exact_match" in result
        lines = (eval_dir / f"{result['name']}.generations.jsonl").read_text().splitlines()
        assert len(lines) == 3 * 2


def test_use_peft_loads_a_lora_student(tmp_path):
    pytest.importorskip("peft")
    from distillens_trainer.models.loading import LoraArguments, load_student

    from conftest import tiny_llama

    tiny_llama(num_layers=2).save_pretrained(tmp_path / "student")
    args = ModelArguments(model_name_or_path=str(tmp_path / "student"))
    student = load_student(args, LoraArguments(use_peft=True, lora_r=2))
    trainable = [name for name, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


@pytest.mark.needs_shared
def test_rouge_l_of_a_real_reference_against_itself_is_100():
    path = shared_path(DATA_DIR / "dolly" / "test_500.jsonl")
    from distillens_trainer.evaluation import rouge_l

    references = [json.loads(line)["output"] for line in path.read_text().splitlines()[:20]]
    assert all(rouge_l(reference, [reference]) == 100.0 for reference in references if reference.strip())
