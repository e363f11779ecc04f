"""Every bad input in docs/errors.md: one clear line, a non-zero exit, and nothing on disk lost.

The command line is driven in-process (``distillens_trainer.cli.main``) on tiny local models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from distillens_demo.data.suite import format_example, generate_examples, train_suite_tokenizer
from distillens_trainer.cli import main

from conftest import tiny_llama

SENTINEL = "checkpoint-7/model.safetensors"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_inputs")
    examples = generate_examples(40, seed=0)
    tokenizer = train_suite_tokenizer([format_example(e) for e in examples], vocab_size=300)
    other_tokenizer = train_suite_tokenizer([format_example(e) for e in generate_examples(40, seed=1)], 290)
    vocab = len(tokenizer)
    models = {
        "student": (tiny_llama(num_layers=2, vocab=vocab, seed=1), tokenizer),
        "teacher": (tiny_llama(num_layers=4, vocab=vocab, seed=2), tokenizer),
        "teacher_padded": (tiny_llama(num_layers=4, vocab=vocab + 16, seed=2), tokenizer),
        "short_context_student": (
            tiny_llama(num_layers=2, vocab=vocab, seed=1, max_positions=128),
            tokenizer,
        ),
        "teacher_other_tokenizer": (
            tiny_llama(num_layers=4, vocab=len(other_tokenizer), seed=2),
            other_tokenizer,
        ),
    }
    for name, (model, model_tokenizer) in models.items():
        model.save_pretrained(root / name)
        model_tokenizer.save_pretrained(root / name)
    rows = [{"instruction": e["instruction"], "input": e["input"], "output": e["output"]} for e in examples]
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "empty.jsonl").write_text("")
    (root / "no_output.jsonl").write_text(json.dumps({"instruction": "hi", "answer": "x"}) + "\n")
    (root / "broken.yaml").write_text("learning_rate: [1e-4\n")
    lines = [json.dumps(row) for row in rows]
    (root / "bad_line.jsonl").write_text("\n".join([*lines[:2], lines[2][:-3], *lines[3:]]) + "\n")
    nulls = [{**row, "output": None} if i == 3 else row for i, row in enumerate(rows)]
    (root / "null_output.jsonl").write_text("\n".join(json.dumps(row) for row in nulls) + "\n")
    (root / "messages_text.jsonl").write_text(json.dumps({"messages": "hello"}) + "\n")
    (root / "mixed").mkdir()
    (root / "mixed" / "a.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "mixed" / "b.csv").write_text("instruction,input,output\nhi,,there\n")
    (root / "deepspeed_broken.json").write_text("{zero_optimization: {stage: 2}}\n")
    nan_student = tiny_llama(num_layers=2, vocab=vocab, seed=1)
    with torch.no_grad():
        nan_student.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    nan_student.save_pretrained(root / "nan_student")
    tokenizer.save_pretrained(root / "nan_student")
    previous_run = root / "previous_run"
    (previous_run / "checkpoint-7").mkdir(parents=True)
    (previous_run / SENTINEL).write_bytes(b"weights")
    return root


def _argv(
    root: Path,
    output_dir: Path,
    *extra: str,
    teacher: str | None = "teacher",
    data: str = "train.jsonl",
    student: str = "student",
):
    argv = [
        "train", "--model_name_or_path", str(root / student), "--train_file", str(root / data),
        "--output_dir", str(output_dir), "--max_steps", "1", "--per_device_train_batch_size", "2",
        "--max_length", "256", "--max_prompt_length", "200", "--lens_num_layers", "1", "--report_to", "none",
        "--use_cpu", "true", "--save_strategy", "no",
    ]  # fmt: skip
    if teacher:
        argv += ["--teacher_model_name_or_path", str(root / teacher)]
    return argv + list(extra)


# (id, extra arguments, keyword overrides of _argv, exit code, words the one-line error must contain)
CASES = [
    (
        "layer_index_0",
        ["--lens_student_layers", "0", "--lens_teacher_layers", "1"],
        {},
        1,
        "lens_student_layers",
    ),
    ("layer_index_too_deep", ["--lens_student_layers", "3", "--lens_teacher_layers", "1"], {}, 1, "1..2"),
    (
        "mismatched_layer_lists",
        ["--lens_student_layers", "1", "--lens_teacher_layers", "1", "2"],
        {},
        1,
        "one teacher layer per",
    ),
    ("student_too_shallow", ["--lens_num_layers", "5"], {}, 1, "too shallow"),
    ("different_tokenizers", [], {"teacher": "teacher_other_tokenizer"}, 1, "different tokenizers"),
    ("missing_teacher", [], {"teacher": None}, 1, "need a teacher"),
    ("teacher_not_found", [], {"teacher": "no_such_teacher"}, 1, "teacher_model_name_or_path="),
    ("unknown_divergence", ["--lens_divergence", "kl"], {}, 2, "invalid choice"),
    ("negative_weight", ["--kd_weight", "-1"], {}, 1, "kd_weight"),
    ("temperature_zero", ["--temperature", "0"], {}, 1, "temperature"),
    ("jsd_beta_out_of_range", ["--jsd_beta", "1.5"], {}, 1, "jsd_beta"),
    ("negative_chunk_size", ["--head_chunk_size", "-1"], {}, 1, "head_chunk_size='-1' must be 'auto'"),
    (
        "deprecated_and_new_chunk_size_disagree",
        ["--lens_chunk_size", "5", "--head_chunk_size", "16"],
        {},
        1,
        "lens_chunk_size='5' and head_chunk_size='16' disagree: lens_chunk_size is the deprecated name of "
        "head_chunk_size; give only head_chunk_size.",
    ),
    ("all_weights_zero", ["--kd_weight", "0", "--lens_weight", "0"], {}, 1, "all 0"),
    ("empty_dataset", [], {"data": "empty.jsonl"}, 1, "empty"),
    ("missing_train_file", [], {"data": "nowhere.jsonl"}, 1, "nowhere.jsonl"),
    ("missing_columns", [], {"data": "no_output.jsonl"}, 1, "column"),
    ("every_prompt_too_long", ["--max_length", "12", "--max_prompt_length", "8"], {}, 1, "max_prompt_length"),
    ("prompt_limit_not_below_max_length", ["--max_prompt_length", "256"], {}, 1, "max_prompt_length"),
    ("unknown_flag", ["--lens_layers", "3"], {}, 2, "unknown arguments"),
    (
        "max_length_beyond_the_context",
        [],
        {"student": "short_context_student"},
        1,
        "--max_length (256) exceeds the student's context of 128 positions",
    ),
    ("lmbda_out_of_range", ["--lmbda", "2"], {}, 1, "lmbda=2.0 must lie in [0, 1]"),
    (
        "max_new_tokens_zero",
        ["--lmbda", "1", "--max_new_tokens", "0"],
        {},
        1,
        "max_new_tokens=0 must be >= 1",
    ),
    (
        "seq_kd_without_a_teacher",
        ["--seq_kd", "true", "--ce_weight", "1", "--kd_weight", "0", "--lens_weight", "0"],
        {"teacher": None},
        1,
        "seq_kd=True samples completions from the teacher",
    ),
    (
        "completions_beyond_the_context",
        ["--lmbda", "1", "--max_length", "64", "--max_prompt_length", "60", "--max_new_tokens", "100"],
        {"student": "short_context_student"},
        1,
        "--max_prompt_length + --max_new_tokens (160) exceeds the student's context of 128 positions",
    ),
    (
        "missing_decontamination_file",
        ["--decontaminate_files", "nowhere.jsonl"],
        {},
        1,
        "--decontaminate_files",
    ),
    ("train_file_not_json_lines", [], {"data": "bad_line.jsonl"}, 1, "bad_line.jsonl:3: invalid JSON ("),
    ("null_output", [], {"data": "null_output.jsonl"}, 1, "null_output.jsonl:4: `output` is null"),
    (
        "messages_not_a_list",
        [],
        {"data": "messages_text.jsonl"},
        1,
        "messages_text.jsonl:1: `messages` is a JSON string, not a list of turns",
    ),
    ("folder_of_mixed_formats", [], {"data": "mixed"}, 1, "several formats (.csv, .jsonl)"),
    (
        "deepspeed_config_not_json",
        ["--deepspeed", "{root}/deepspeed_broken.json"],
        {},
        1,
        "deepspeed_broken.json' is not JSON (Expecting property name enclosed in double quotes at line 1",
    ),
    (
        "fsdp_v1_in_one_process",
        ["--fsdp", "full_shard", "--fsdp_config", '{"fsdp_version": 1}'],
        {},
        1,
        "supports FSDP2, not FSDP v1: set fsdp_version: 2",
    ),
    (
        "duplicate_lens_pairs",
        ["--lens_student_layers", "1", "1", "--lens_teacher_layers", "2", "2"],
        {},
        1,
        "the lens pair (student layer 1, teacher layer 2) is listed twice",
    ),
    ("teacher_path_that_does_not_exist", [], {"teacher": "no/such/teacher"}, 1, "no such folder"),
]


@pytest.mark.parametrize(
    ("extra", "overrides", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line_and_nonzero_and_writes_nothing(
    workspace, tmp_path, capsys, extra, overrides, code, words
):
    output_dir = tmp_path / "run"
    extra = [argument.replace("{root}", str(workspace)) for argument in extra]
    assert main(_argv(workspace, output_dir, *extra, **overrides)) == code
    stderr = capsys.readouterr().err.strip().splitlines()  # progress bars may precede the error
    errors = [line for line in stderr if line.startswith("distillens train: error:")]
    assert len(errors) == 1 and stderr[-1] == errors[0], stderr
    assert words in errors[0], errors[0]
    assert not output_dir.exists()  # left as it was found: no record, no empty folder


def test_an_unreadable_config_file_is_refused(workspace, capsys):
    assert main(["train", str(workspace / "broken.yaml")]) == 2
    assert "could not be read" in capsys.readouterr().err


def test_a_non_empty_output_dir_is_refused_and_kept(workspace, capsys):
    assert main(_argv(workspace, workspace / "previous_run")) == 1
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert (workspace / "previous_run" / SENTINEL).read_bytes() == b"weights"


def test_a_failing_run_into_an_existing_output_dir_keeps_its_checkpoint(workspace, capsys):
    argv = _argv(
        workspace, workspace / "previous_run", "--overwrite_output_dir", "true", "--lens_num_layers", "9"
    )
    assert main(argv) == 1
    assert "too shallow" in capsys.readouterr().err
    assert (workspace / "previous_run" / SENTINEL).read_bytes() == b"weights"
    assert sorted(p.name for p in (workspace / "previous_run").iterdir()) == ["checkpoint-7"]


def test_a_launch_whose_processes_would_train_alone_is_refused(workspace, tmp_path, capsys, monkeypatch):
    # As torchrun leaves a CPU-only rank without --use_cpu: WORLD_SIZE=2, but a Trainer world of one.
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = _argv(workspace, tmp_path / "run")
    at = argv.index("--use_cpu")
    del argv[at : at + 2]
    assert main(argv) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("distillens train: error: launched as 2 processes, but each would train alone")
    assert "--use_cpu true" in line
    assert not (tmp_path / "run").exists()


def test_a_padded_vocabulary_teacher_is_accepted(workspace, tmp_path, capsys):
    assert main(_argv(workspace, tmp_path / "run", teacher="teacher_padded")) == 0, capsys.readouterr().err
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert student.get_output_embeddings().weight.shape[0] == len(
        transformers.AutoTokenizer.from_pretrained(workspace / "student")
    )
    assert torch.isfinite(student.get_output_embeddings().weight).all()


def test_a_too_shallow_student_is_refused_before_any_weights_are_read(
    workspace, tmp_path, capsys, monkeypatch
):
    from distillens_trainer.commands import train
    from distillens_trainer.teacher import frozen as teacher

    def no_loading(*args, **kwargs):
        raise AssertionError("model weights were read before the student's depth was checked")

    monkeypatch.setattr(train, "load_student", no_loading)
    monkeypatch.setattr(teacher, "load_teacher", no_loading)
    assert main(_argv(workspace, tmp_path / "run", "--lens_num_layers", "5")) == 1
    assert "too shallow for lens_num_layers=5" in capsys.readouterr().err


def test_eval_defaults_on_a_short_context_model_stop_in_one_line_before_loading(workspace, tmp_path, capsys):
    eval_file = workspace / "train.jsonl"
    argv = ["eval", "--model_name_or_path", str(workspace / "short_context_student")]
    argv += ["--eval_files", str(eval_file), "--output_dir", str(tmp_path / "eval")]
    assert main(argv) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        "distillens eval: error: --max_prompt_length 256 + --max_new_tokens 256 (512) exceeds"
    )
    assert "context of 128 positions" in line
    assert not (tmp_path / "eval").exists()


def test_eval_of_a_model_with_non_finite_weights_is_one_line(workspace, tmp_path, capsys):
    argv = ["eval", "--model_name_or_path", str(workspace / "nan_student"), "--eval_files"]
    argv += [
        str(workspace / "train.jsonl"),
        "--output_dir",
        str(tmp_path / "eval"),
        "--max_eval_samples",
        "2",
    ]
    argv += ["--max_prompt_length", "64", "--max_new_tokens", "4"]
    assert main(argv) == 1
    (line,) = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert line.startswith("distillens eval: error: model_name_or_path=")
    assert "non-finite weights (NaN or inf in model.layers.0.mlp.up_proj.weight)" in line
    assert not (tmp_path / "eval").exists()


def test_a_teacher_path_that_does_not_exist_is_refused_before_the_student_loads(
    workspace, tmp_path, capsys, monkeypatch
):
    from distillens_trainer.commands import train

    def no_loading(*args, **kwargs):
        raise AssertionError("the student was loaded before the teacher path was checked")

    monkeypatch.setattr(train, "load_student", no_loading)
    argv = _argv(workspace, tmp_path / "run", teacher=None)
    assert main([*argv, "--teacher_model_name_or_path", "./no_such_teacher"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        "distillens train: error: teacher_model_name_or_path='./no_such_teacher': no such folder"
    )
