"""Checkpoints and resuming: an interrupted run resumes exactly where the uninterrupted one would be.

Single process, tiny Llama teacher (4 layers) and student (3 layers, tied head), 12 optimizer steps
over 3 shuffled epochs of 4 batches, a checkpoint every 6 steps (so the resume point is mid-epoch),
attention dropout on so the RNG state has to be restored too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from distillens_trainer import DistillLensTrainer

from conftest import load_tiny_training_script

TOTAL_STEPS = 12
SAVE_STEPS = 6
NUM_SAMPLES = 16  # 4 batches of 4 per epoch: step 6 is the middle of the second epoch
STEP_KEYS = ("loss", "grad_norm", "kd_loss", "lens_loss", "ce_loss")

pytestmark = pytest.mark.slow


tiny = load_tiny_training_script()


class InterruptAfterSave(TrainerCallback):
    """Ctrl-C right after the checkpoint of ``step`` is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def _trainer(models: Path, out: Path, callbacks=()) -> DistillLensTrainer:
    args = tiny.training_config(
        out,
        max_steps=TOTAL_STEPS,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
    )
    student = AutoModelForCausalLM.from_pretrained(
        models / "student", dtype=torch.float32, attention_dropout=0.1
    )
    return DistillLensTrainer(
        model=student,
        args=args,
        teacher_model=str(models / "teacher"),
        train_dataset=tiny.TokenDataset(NUM_SAMPLES, seed=0),
        processing_class=AutoTokenizer.from_pretrained(models / "student"),
        callbacks=list(callbacks),
    )


def _steps(trainer: DistillLensTrainer) -> dict[int, dict]:
    return {
        entry["step"]: entry
        for entry in trainer.state.log_history
        if "loss" in entry and "train_runtime" not in entry
    }


def _student_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def models(tiny_run_models) -> Path:
    return tiny_run_models


@pytest.fixture(scope="module")
def uninterrupted(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    trainer = _trainer(models, out)
    trainer.train()
    return trainer, out


@pytest.fixture(scope="module")
def interrupted(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("interrupted")
    trainer = _trainer(models, out, callbacks=[InterruptAfterSave(SAVE_STEPS)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    return trainer, out


@pytest.fixture(scope="module")
def resumed(models, interrupted):
    _, out = interrupted
    trainer = _trainer(models, out)  # a fresh trainer, as after restarting the script
    trainer.train(resume_from_checkpoint=True)  # the latest checkpoint in output_dir
    return trainer, out


def test_interrupt_leaves_the_last_checkpoint_complete_and_loadable(interrupted):
    trainer, out = interrupted
    assert trainer.state.global_step == SAVE_STEPS
    checkpoints = sorted(path.name for path in out.glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{SAVE_STEPS}"]
    checkpoint = out / checkpoints[0]
    for name in ("model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert (checkpoint / name).is_file(), name
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == SAVE_STEPS
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    in_memory = _student_tensors(trainer.model)
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, in_memory[name], rtol=0, atol=0, msg=name)


def test_checkpoints_hold_only_the_student(models, uninterrupted, interrupted):
    from safetensors import safe_open

    student = AutoModelForCausalLM.from_pretrained(models / "student")
    student_keys = set(student.state_dict())
    unique_numel = sum(param.numel() for param in student.parameters())  # tied head counted once
    checkpoints = [*uninterrupted[1].glob("checkpoint-*"), *interrupted[1].glob("checkpoint-*")]
    assert len(checkpoints) == 3
    for checkpoint in checkpoints:
        with safe_open(str(checkpoint / "model.safetensors"), "pt") as handle:
            keys = set(handle.keys())
            numel = sum(torch.Size(handle.get_slice(key).get_shape()).numel() for key in keys) if keys else 0
        assert keys <= student_keys, sorted(keys - student_keys)[:5]
        assert numel == unique_numel
        # The optimizer only ever saw the student's parameters.
        optimizer = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False)
        num_params = sum(len(group["params"]) for group in optimizer["param_groups"])
        assert num_params == len(list(student.parameters()))
        assert sorted(path.name for path in checkpoint.iterdir() if "teacher" in path.name.lower()) == []


def test_resumed_steps_equal_the_uninterrupted_run(uninterrupted, resumed):
    reference, _ = uninterrupted
    trainer, _ = resumed
    assert trainer.state.global_step == TOTAL_STEPS
    want, got = _steps(reference), _steps(trainer)
    assert sorted(want) == list(range(1, TOTAL_STEPS + 1))
    assert sorted(got) == list(range(1, TOTAL_STEPS + 1))  # steps 1-6 come from the checkpoint's state
    # Same ops, same data order (seeded sampler, skipped batches), restored RNG/optimizer/scheduler
    # states, one process: the resumed steps are reproduced exactly in practice (measured difference
    # 0.0). 1e-6 relative allows for nothing more than a last-bit difference.
    for step in range(SAVE_STEPS + 1, TOTAL_STEPS + 1):
        for key in (*STEP_KEYS, "learning_rate"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-12), f"step {step} {key}"
    final, reference_final = _student_tensors(trainer.model), _student_tensors(reference.model)
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, reference_final[name], rtol=1e-6, atol=1e-7, msg=name)


def test_a_different_interruption_changes_nothing_before_it(uninterrupted, interrupted):
    """Sanity: up to the interruption both runs are the same run."""
    want, got = _steps(uninterrupted[0]), _steps(interrupted[0])
    for step in range(1, SAVE_STEPS + 1):
        assert got[step]["loss"] == want[step]["loss"]
