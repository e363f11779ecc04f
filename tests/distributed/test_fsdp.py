"""FSDP2 on 2 CPU processes (gloo): ``tests/distributed/train_tiny.py`` launched with torchrun (the Trainer's ``fsdp``
arguments) and with ``accelerate launch`` (``examples/fsdp/fsdp2.yaml``), a Qwen2 teacher distilled into a Llama
student, compared with one process on the same global batch (2 x 2 vs 1 x 4; see tests/distributed/test_distributed.py for why
the data order is the same). The student is sharded by accelerate, the teacher by DistillLensTrainer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import ROOT, cli_train_command, free_port, launch, launch_env, logged_steps, torchrun

from conftest import load_tiny_training_script

tiny = load_tiny_training_script()
distributed = pytest.mark.distributed

TEACHER = "qwen2_teacher"  # another architecture (and width) than the Llama student's
STEPS = 6
SAVE_STEPS = 3
# Measured on 2 CPU cores (fp32): at most 2e-7 relative per step on the loss terms, a few fp32 ulps from the
# reduction order (the goal is 2e-3).
STEP_RTOL = 1e-4
STEP_KEYS = ("loss", "grad_norm", "kd_loss", "lens_loss", "ce_loss")
PATHS = {"fused": [], "straightforward": ["--head-chunk-size", "0"]}


@pytest.fixture(scope="module")
def models(tiny_run_models) -> Path:
    return tiny_run_models


@pytest.fixture(scope="module")
def single(models, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """One process, 1 x 4, on each path of the objective."""
    runs = {}
    for path, extra in PATHS.items():
        out = tmp_path_factory.mktemp(f"single_{path}")
        overrides = {"head_chunk_size": 0} if extra else {"lens_eval_profile": True}
        tiny.train(
            models, out, per_device_batch=4, steps=STEPS, evaluate=True, teacher_name=TEACHER, **overrides
        )
        runs[path] = (json.loads((out / "result.json").read_text()), out)
    return runs


@pytest.fixture(scope="module")
def fsdp(models, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """torchrun x 2 with the Trainer's fsdp arguments (FSDP2), on each path, checkpointing at step 3."""
    runs = {}
    for path, extra in PATHS.items():
        out = tmp_path_factory.mktemp(f"fsdp_{path}")
        options = ["--fsdp", "--teacher", TEACHER, "--per-device-batch", "2", "--steps", str(STEPS)]
        options += ["--save-steps", str(SAVE_STEPS), "--evaluate", *(extra or ["--lens-eval-profile"])]
        runs[path] = (torchrun(out, models, *options), out)
    return runs


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"result_rank{rank}.json").read_text()) for rank in (0, 1)]


@distributed
@pytest.mark.parametrize("path", list(PATHS))
def test_fsdp2_follows_the_single_process_loss_curve(path, single, fsdp):
    result, _ = fsdp[path]
    reference, _ = single[path]
    assert result["world_size"] == 2 and result["fsdp_version"] == 2
    assert result["fused"] == reference["fused"] == {"lens": path == "fused", "output": path == "fused"}
    got, want = logged_steps(result), logged_steps(reference)
    assert len(got) == len(want) == STEPS
    for step, (got_step, want_step) in enumerate(zip(got, want), start=1):
        for key in STEP_KEYS:
            assert got_step[key] == pytest.approx(want_step[key], rel=STEP_RTOL), f"step {step} {key}"
    for key in ("eval_ce_loss", "eval_kd_loss", "eval_lens_loss"):  # token-weighted: batch-split invariant
        assert result["eval_metrics"][key] == pytest.approx(reference["eval_metrics"][key], rel=STEP_RTOL)
    profile = {k: v for k, v in reference["eval_metrics"].items() if k.startswith("eval_lens_")}
    if path == "fused":  # lens_eval_profile: the per-layer figures read through the gathered norm and heads
        assert any(k.startswith("eval_lens_profile/") for k in profile)
        for key, value in profile.items():
            assert result["eval_metrics"][key] == pytest.approx(value, rel=STEP_RTOL), key


@distributed
def test_fsdp2_shards_the_teacher_by_its_own_decoder_layers(models, fsdp):
    from transformers import AutoModelForCausalLM

    result, out = fsdp["fused"]
    assert result["teacher_class"] == "FSDPQwen2ForCausalLM"  # sharded in place, whatever the student is
    teacher = AutoModelForCausalLM.from_pretrained(models / TEACHER, dtype=torch.float32)
    whole = 4 * sum(p.numel() for p in teacher.parameters())
    for rank in _ranks(out):
        assert rank["teacher_bytes"]["whole"] == whole  # counted from the shards' global shapes
        local = rank["teacher_bytes"]["local"]
        assert local / whole <= 0.55, f"rank {rank['rank']}: {local} of {whole} bytes"


@distributed
@pytest.mark.parametrize("path", list(PATHS))
def test_fsdp2_gathers_each_head_once_per_step_and_reduces_its_gradient_once(path, fsdp):
    _, out = fsdp[path]
    for rank in _ranks(out):
        steps = rank["fsdp_head_gathers"]
        assert len(steps) == STEPS
        # Not once per chunk or lens pair: the forward gathers each model's head group and the objective reuses it.
        assert steps == [{"student": 1, "teacher": 1, "student_head_reductions": 1}] * STEPS, rank["rank"]


@distributed
def test_fsdp2_saved_student_loads_and_equals_the_single_process_student(models, single, fsdp):
    from transformers import AutoModelForCausalLM

    _, out = fsdp["fused"]
    _, single_out = single["fused"]
    student = AutoModelForCausalLM.from_pretrained(out / "student", dtype=torch.float32).eval()
    assert type(student).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        logits = student(input_ids=tiny.probe_batch()).logits
    torch.testing.assert_close(logits, torch.load(out / "probe_logits.pt"), rtol=0, atol=1e-6)
    # The same 6 steps in one process (measured 3e-6 on logits of magnitude ~4).
    torch.testing.assert_close(logits, torch.load(single_out / "probe_logits.pt"), rtol=1e-4, atol=1e-4)
    student_keys = set(AutoModelForCausalLM.from_pretrained(models / "student").state_dict())
    from safetensors import safe_open

    saved = sorted(out.rglob("*.safetensors"))
    assert len(saved) == 1 + STEPS // SAVE_STEPS
    for path in saved:  # the final save and every checkpoint: the student only
        with safe_open(str(path), "pt") as handle:
            assert set(handle.keys()) <= student_keys, path
    fsdp_states = sorted(out.rglob("pytorch_model_fsdp.bin"))  # FSDP's own model state in each checkpoint
    assert len(fsdp_states) == STEPS // SAVE_STEPS
    for path in fsdp_states:
        assert set(torch.load(path, map_location="cpu", weights_only=True)) == student_keys, path


@distributed
def test_fsdp2_resume_continues_bit_exactly(models, fsdp, tmp_path):
    result, out = fsdp["fused"]
    resumed_out = tmp_path / "resumed"
    checkpoint = resumed_out / "run" / f"checkpoint-{SAVE_STEPS}"
    shutil.copytree(out / "run" / f"checkpoint-{SAVE_STEPS}", checkpoint)
    options = ["--fsdp", "--teacher", TEACHER, "--per-device-batch", "2", "--steps", str(STEPS)]
    resumed = torchrun(resumed_out, models, *options, "--resume", str(checkpoint))
    got = [step["loss"] for step in logged_steps(resumed)][SAVE_STEPS:]
    want = [step["loss"] for step in logged_steps(result)][SAVE_STEPS:]
    assert len(got) == STEPS - SAVE_STEPS and got == want
    assert torch.equal(torch.load(resumed_out / "probe_logits.pt"), torch.load(out / "probe_logits.pt"))


@distributed
def test_fsdp2_under_accelerate_launch_with_the_example_config_trains_in_bf16(models, single, tmp_path):
    """examples/fsdp/fsdp2.yaml as it is (bf16 through FSDP2's mixed-precision policy); the CPU shim in
    train_tiny stands in for the GPUs."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    launcher += ["--config_file", str(ROOT / "examples" / "fsdp" / "fsdp2.yaml"), "--num_processes", "2"]
    launcher += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    options = ["--teacher", TEACHER, "--per-device-batch", "2", "--steps", str(STEPS)]
    result = launch(launcher, tmp_path / "accelerate", models, *options)
    assert result["world_size"] == 2 and result["fsdp_version"] == 2
    assert result["fused"] == {"lens": True, "output": True}
    for rank in _ranks(tmp_path / "accelerate"):
        assert (
            rank["teacher_bytes"]["dtype"] == "torch.bfloat16"
        )  # teacher_dtype auto follows mixed precision
        assert (
            rank["fsdp_head_gathers"] == [{"student": 1, "teacher": 1, "student_head_reductions": 1}] * STEPS
        )
    reference, _ = single["fused"]
    got = [step["loss"] for step in logged_steps(result)]
    want = [step["loss"] for step in logged_steps(reference)]
    # bf16 weights and products against fp32: measured within 1e-2 relative per step.
    assert got == pytest.approx(want, rel=3e-2)


@distributed
def test_fsdp2_on_policy_windows_sample_in_step_on_both_ranks(models, tmp_path):
    """The student samples its completions while sharded: every forward of generate gathers layer by layer on both
    ranks, so generate runs with synced_gpus (a rank that stopped early would leave the other waiting)."""
    options = ["--fsdp", "--teacher", TEACHER, "--per-device-batch", "2", "--steps", "3"]
    result = torchrun(tmp_path / "on_policy", models, *options, "--lmbda", "1", "--max-new-tokens", "6")
    steps = logged_steps(result)
    assert [step["on_policy_fraction"] for step in steps] == [1.0] * 3
    assert all(0 < step["completion_length"] <= 6 for step in steps)
    assert all(torch.isfinite(torch.tensor(step["loss"])) for step in steps)
    for rank in _ranks(tmp_path / "on_policy"):
        assert [step["teacher"] for step in rank["fsdp_head_gathers"]] == [1] * 3
        assert [step["student_head_reductions"] for step in rank["fsdp_head_gathers"]] == [1] * 3


@distributed
def test_fsdp_asked_for_where_accelerate_would_run_ddp_stops_the_cli_with_one_line(models, tmp_path):
    """torchrun on CPUs with --fsdp: accelerate would train as DDP (a full student and teacher per rank)."""
    command, out = cli_train_command(models, TEACHER, tmp_path)
    command += ["--fsdp", "--fsdp_config", '{"fsdp_version": 2}']
    done = subprocess.run(command, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [
        line for line in done.stdout.splitlines() + done.stderr.splitlines() if "distillens train:" in line
    ]
    assert errors and all("fsdp is set but accelerate runs this job as MULTI_CPU" in line for line in errors)
    assert "Traceback" not in "\n".join(line for line in done.stderr.splitlines() if "[rank" in line)
    assert not list(out.rglob("*.safetensors"))  # stopped before training
