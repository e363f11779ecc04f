"""Nothing lost: whole checkpoints, the run record written once training begins, and every command's output folder
checked before any weights load (docs/errors.md rows 105-112 and 22).

The command line runs in-process (``distillens_trainer.cli.main``) on tiny local models.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import transformers

from distillens_demo.data.suite import format_example, generate_examples, train_suite_tokenizer
from distillens_trainer import DistillLensTrainer
from distillens_trainer.cli import main
from distillens_trainer.files import write_failure_line
from distillens_trainer.trainer.checkpoints import (
    checkpoint_problem,
    newest_complete_checkpoint,
    resolve_resume_from_checkpoint,
)

from conftest import tiny_llama

RECORD = "distillens_config.json"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("whole_runs")
    examples = generate_examples(24, seed=0)
    tokenizer = train_suite_tokenizer([format_example(e) for e in examples], vocab_size=300)
    vocab = len(tokenizer)
    models = {
        "student": tiny_llama(num_layers=2, vocab=vocab, seed=1),
        "teacher": tiny_llama(num_layers=4, vocab=vocab, seed=2),
        "short_context_teacher": tiny_llama(num_layers=4, vocab=vocab, seed=2, max_positions=128),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = [{"instruction": e["instruction"], "input": e["input"], "output": e["output"]} for e in examples]
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "a_file").write_text("not a folder")
    return root


def _train_argv(root: Path, output_dir: Path | str, *extra: str) -> list[str]:
    return [
        "train", "--model_name_or_path", str(root / "student"), "--teacher_model_name_or_path",
        str(root / "teacher"), "--train_file", str(root / "train.jsonl"), "--output_dir", str(output_dir),
        "--max_steps", "4", "--per_device_train_batch_size", "2", "--max_length", "256",
        "--max_prompt_length", "200", "--lens_num_layers", "1", "--report_to", "none", "--use_cpu", "true",
        "--save_strategy", "steps", "--save_steps", "2", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def _one_error_line(capsys, command: str) -> str:
    stderr = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in stderr if line.startswith(f"distillens {command}: error:")]
    assert len(errors) == 1 and stderr[-1] == errors[0], stderr
    return errors[0]


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(workspace, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoint-2 and checkpoint-4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(_train_argv(workspace, out)) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------------------------------ whole checkpoints
def test_a_checkpoint_written_by_a_run_is_whole(finished_run):
    for folder in finished_run.glob("checkpoint-*"):
        assert checkpoint_problem(folder) is None, folder


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("delete trainer_state.json", "trainer_state.json is missing"),
        ("truncate trainer_state.json", "trainer_state.json is not valid JSON"),
        ("truncate optimizer.pt", "optimizer.pt is cut short"),
        ("truncate model.safetensors", "model.safetensors is cut short"),
    ],
)
def test_a_half_written_checkpoint_is_recognised_naming_the_file(run_copy, damage, named):
    action, name = damage.split(" ")
    file = run_copy / "checkpoint-4" / name
    file.unlink() if action == "delete" else _truncate(file)
    problem = checkpoint_problem(run_copy / "checkpoint-4")
    assert problem is not None and problem.startswith(named), problem
    assert newest_complete_checkpoint(run_copy) == run_copy / "checkpoint-2"


def test_resume_true_resumes_from_the_newest_complete_checkpoint(workspace, run_copy, monkeypatch, caplog):
    """The contract: trainer_state.json deleted from the newest checkpoint, ``--resume_from_checkpoint true``
    resumes from the newest complete one (with one logged line for the skipped one)."""
    (run_copy / "checkpoint-4" / "trainer_state.json").unlink()
    loaded: list[str] = []
    load = DistillLensTrainer._load_from_checkpoint

    def spy(self, resume_from_checkpoint, model=None):
        loaded.append(resume_from_checkpoint)
        return load(self, resume_from_checkpoint, model)

    monkeypatch.setattr(DistillLensTrainer, "_load_from_checkpoint", spy)
    with caplog.at_level("WARNING", logger="distillens_trainer.trainer.checkpoints"):
        assert main(_train_argv(workspace, run_copy, "--resume_from_checkpoint", "true")) == 0
    assert loaded == [str(run_copy / "checkpoint-2")]
    skipped = [
        r.getMessage() for r in caplog.records if "skipping the incomplete checkpoint" in r.getMessage()
    ]
    assert len(skipped) == 1 and "checkpoint-4" in skipped[0] and "trainer_state.json" in skipped[0]
    state = json.loads((run_copy / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4  # steps 3-4 were trained again and checkpoint-4 is whole again
    assert checkpoint_problem(run_copy / "checkpoint-4") is None


def test_an_explicitly_named_damaged_checkpoint_is_one_line_naming_the_file(workspace, run_copy, capsys):
    _truncate(run_copy / "checkpoint-2" / "optimizer.pt")
    before = _listing(run_copy)
    argv = _train_argv(workspace, run_copy, "--resume_from_checkpoint", str(run_copy / "checkpoint-2"))
    assert main(argv) == 1
    line = _one_error_line(capsys, "train")
    assert "checkpoint-2" in line and "optimizer.pt is cut short" in line, line
    assert _listing(run_copy) == before


def test_resume_true_without_a_complete_checkpoint_is_one_line(workspace, run_copy, capsys):
    for folder in run_copy.glob("checkpoint-*"):
        (folder / "trainer_state.json").unlink()
    assert main(_train_argv(workspace, run_copy, "--resume_from_checkpoint", "true")) == 1
    assert "found no complete checkpoint-N folder" in _one_error_line(capsys, "train")


def test_a_save_over_an_existing_checkpoint_folder_is_incomplete_until_it_finishes(workspace, run_copy):
    """Saving into a folder an earlier run left: its old trainer_state.json goes first, so a save cut short there
    is not mistaken for the older checkpoint."""
    seen: dict[str, bool] = {}
    save = DistillLensTrainer._save_optimizer_and_scheduler

    def interrupted(self, output_dir):
        seen["marker_present"] = (Path(output_dir) / "trainer_state.json").exists()
        save(self, output_dir)
        raise KeyboardInterrupt  # killed while saving

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DistillLensTrainer, "_save_optimizer_and_scheduler", interrupted)
        assert main(_train_argv(workspace, run_copy, "--overwrite_output_dir", "true")) == 130  # as Ctrl-C
    assert seen == {"marker_present": False}
    assert checkpoint_problem(run_copy / "checkpoint-2").startswith("trainer_state.json is missing")
    assert newest_complete_checkpoint(run_copy) == run_copy / "checkpoint-4"


def test_resume_values_that_mean_no_resume(tmp_path):
    for value in (None, False, "", "false", "False"):
        assert resolve_resume_from_checkpoint(value, tmp_path) is None


# ------------------------------------------------------------------------------------------- the run record
def _fail_before_training(monkeypatch) -> None:
    """Setup inside ``Trainer.train`` fails (as a refused teacher or an out-of-memory would), before step 1."""

    def refuse(self):
        raise ValueError("setup failed before training")

    monkeypatch.setattr(DistillLensTrainer, "get_train_dataloader", refuse)


def test_a_run_failing_before_training_leaves_no_folder_and_its_rerun_is_accepted(
    workspace, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "new" / "run"
    with monkeypatch.context() as patch:
        _fail_before_training(patch)
        assert main(_train_argv(workspace, out, "--max_steps", "1")) == 1
    assert "setup failed before training" in _one_error_line(capsys, "train")
    assert not (tmp_path / "new").exists()  # as it found it: the folders it would have created are gone
    assert main(_train_argv(workspace, out, "--max_steps", "1", "--save_strategy", "no")) == 0
    assert json.loads((out / RECORD).read_text())["training"]["max_steps"] == 1


def test_a_failing_overwrite_run_keeps_the_finished_runs_record(workspace, run_copy, monkeypatch, capsys):
    """docs/errors.md row 22, for a failure after the models loaded: nothing in the folder changes."""
    before = _listing(run_copy)
    _fail_before_training(monkeypatch)
    argv = _train_argv(workspace, run_copy, "--overwrite_output_dir", "true", "--learning_rate", "0.5")
    assert main(argv) == 1
    _one_error_line(capsys, "train")
    assert _listing(run_copy) == before


# ---------------------------------------------------------------------------------------- the output folder
def _command_argv(root: Path, command: str, output_dir: str) -> list[str]:
    student, teacher, data = str(root / "student"), str(root / "teacher"), str(root / "train.jsonl")
    return {
        "train": _train_argv(root, output_dir),
        "cache-teacher": [
            "cache-teacher", "--teacher_model_name_or_path", teacher, "--model_name_or_path", student,
            "--train_file", data, "--max_length", "256", "--max_prompt_length", "200", "--output_dir", output_dir,
        ],
        "lens": [
            "lens", "--model_name_or_path", student, "--teacher_model_name_or_path", teacher, "--data_file", data,
            "--max_samples", "4", "--device", "cpu", "--output_dir", output_dir,
        ],
        "eval": [
            "eval", "--model_name_or_path", student, "--eval_files", data, "--max_prompt_length", "64",
            "--max_new_tokens", "4", "--output_dir", output_dir,
        ],
        "shrink": ["shrink", "--model_name_or_path", teacher, "--num_layers", "2", "--output_dir", output_dir],
    }[command]  # fmt: skip


COMMANDS = ["train", "cache-teacher", "lens", "eval", "shrink"]


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any model weights are read."""

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were read before the output folder was checked")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))


@pytest.mark.parametrize("command", COMMANDS)
def test_an_empty_output_dir_flag_is_called_empty(workspace, command, capsys, no_weights):
    assert main(_command_argv(workspace, command, "")) == 1
    line = _one_error_line(capsys, command)
    assert "output_dir is empty" in line and "not empty" not in line, line


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_dir_under_a_file_is_one_line_before_any_weights(workspace, command, capsys, no_weights):
    output_dir = workspace / "a_file" / "run"
    assert main(_command_argv(workspace, command, str(output_dir))) == 1
    line = _one_error_line(capsys, command)
    assert f"output_dir={str(output_dir)!r} lies under the file" in line, line
    assert (workspace / "a_file").read_text() == "not a folder"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_output_dir_is_one_line_before_any_weights(
    workspace, tmp_path, command, capsys, monkeypatch, no_weights
):
    from distillens_trainer import files

    read_only = tmp_path / "read_only"
    read_only.mkdir()
    # As on a read-only file system (chmod does not stop root, who runs these tests in containers).
    monkeypatch.setattr(files.os, "access", lambda path, mode: Path(path) != read_only)
    output_dir = read_only / "run"
    assert main(_command_argv(workspace, command, str(output_dir))) == 1
    line = _one_error_line(capsys, command)
    assert f"output_dir={str(output_dir)!r} cannot be written" in line and "read-only" in line, line
    assert list(read_only.iterdir()) == []


def test_a_full_disk_while_saving_is_one_line_naming_the_folder(workspace, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def full_disk(self, output_dir=None, state_dict=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "model.safetensors"))

    monkeypatch.setattr(DistillLensTrainer, "_save", full_disk)
    assert main(_train_argv(workspace, out, "--max_steps", "1", "--save_strategy", "no")) == 1
    line = _one_error_line(capsys, "train")
    assert line.startswith(f"distillens train: error: could not write into output_dir={str(out)!r}: No space")
    assert "--resume_from_checkpoint true" in line


@pytest.mark.parametrize(
    ("error", "converted"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EROFS, "Read-only file system", "OUT/x.json"), True),
        (OSError(errno.EACCES, "Permission denied", "OUT/.x.json.tmp"), True),
        (OSError(errno.EACCES, "Permission denied", "/etc/elsewhere"), False),  # not a write into the folder
        (FileNotFoundError(errno.ENOENT, "No such file", "OUT/data.jsonl"), False),
        (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), True),
        # an internal error keeps its traceback
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    ],
)
def test_only_failed_writes_into_the_output_dir_become_one_line(tmp_path, error, converted):
    out = tmp_path / "out"
    if isinstance(error, OSError) and error.filename and error.filename.startswith("OUT"):
        error.filename = str(out / error.filename[4:])
    line = write_failure_line(error, out, "choose another --output_dir")
    assert (line is not None) == converted, line
    if converted:
        assert line.startswith(f"could not write into output_dir={str(out)!r}: ") and "\n" not in line


# ------------------------------------------------------------------------------------- lengths and contexts
@pytest.mark.parametrize("command", ["cache-teacher", "lens"])
def test_max_length_beyond_a_models_context_names_the_flag_and_both_limits(
    workspace, tmp_path, command, capsys, no_weights
):
    argv = _command_argv(workspace, command, str(tmp_path / "out"))
    at = argv.index("--teacher_model_name_or_path")
    argv[at + 1] = str(workspace / "short_context_teacher")
    argv += ["--max_length", "256", "--max_prompt_length", "200"] if command == "lens" else []
    assert main(argv) == 1
    line = _one_error_line(capsys, command)
    assert (
        "--max_length (256) exceeds the teacher's context of 128 positions (the student's: 2048)" in line
    ), line
    assert "pass --max_length 128 or less" in line
    assert not (tmp_path / "out").exists()
