"""Teacher placement and the end of a launched rank (distributed.py); multi-process DeepSpeed ZeRO-2/3 runs on
the CPU.

The ``distributed`` tests launch ``tests/distributed/train_tiny.py`` on 2 CPU processes (gloo) with
torchrun (``examples/deepspeed/zero2.json``, ``zero3.json``) and with accelerate
(``examples/accelerate/deepspeed_zero3.yaml``), and compare them with a single-process run without
DeepSpeed on the same global batch (2 x 2 vs 1 x 4). The data order is the same: accelerate's seeded
sampler gives every process the same permutation and hands out whole per-device batches in turn, so
global step k sees the same 4 samples in every run.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launching import (
    HELPER,
    ROOT,
    cli_train_command,
    free_port,
    launch,
    launch_env,
    logged_steps,
    run_logged,
    torchrun,
    torchrun_launcher,
)
from torch import nn

from distillens_trainer import cli
from distillens_trainer.commands.process import end_process_group
from distillens_trainer.distributed.fsdp import decoder_layer_classes, fsdp_version
from distillens_trainer.teacher.placement import (
    is_zero3_enabled,
    prepare_teacher,
    teacher_zero3_config,
)
from distillens_trainer.trainer.on_policy import window_is_on_policy

from conftest import load_tiny_training_script

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


tiny = load_tiny_training_script()


# --------------------------------------------------------------------------------------------- unit tests
def _accelerator(*, zero_stage: int | None = None, config: dict | None = None, fsdp: int | None = None):
    plugin = (
        None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage, deepspeed_config=config or {})
    )
    fsdp_plugin = SimpleNamespace(fsdp_version=fsdp) if fsdp else None
    state = SimpleNamespace(deepspeed_plugin=plugin, fsdp_plugin=fsdp_plugin)
    return SimpleNamespace(state=state, distributed_type="FSDP" if fsdp else "NO")


def _args(**overrides):
    settings = {
        "teacher_dtype": "auto",
        "bf16": False,
        "fp16": False,
        "device": torch.device("cpu"),
        "fsdp": None,
    }
    settings.update(overrides)
    return SimpleNamespace(**settings)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(hidden_size=8)
        self.linear = nn.Linear(8, 8)
        self.dropout = nn.Dropout(0.5)


ZERO3_CONFIG = {
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3,
        "offload_param": {"device": "cpu"},
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": 0,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


def test_teacher_zero3_config_is_inference_only_and_leaves_the_student_config_alone():
    original = json.loads(json.dumps(ZERO3_CONFIG))
    config = teacher_zero3_config(
        ZERO3_CONFIG, _Tiny(), torch.bfloat16, micro_batch_size=2, gradient_accumulation_steps=3, world_size=4
    )
    assert original == ZERO3_CONFIG  # a deep copy: the student's engine config is untouched
    assert "optimizer" not in config and "scheduler" not in config
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["reduce_bucket_size"] == 64  # hidden²
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64)
    assert zero["stage3_param_persistence_threshold"] == 0  # an explicit value is kept
    assert zero["offload_param"] == {"device": "cpu"}
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (2, 3)
    assert config["train_batch_size"] == 2 * 3 * 4
    assert "gradient_clipping" not in config  # still "auto": dropped, DeepSpeed's default applies
    assert "auto" not in json.dumps(config)


def test_teacher_zero3_config_fills_auto_persistence_threshold_and_keeps_fp32():
    config = teacher_zero3_config(
        {**ZERO3_CONFIG, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto"}},
        _Tiny(),
        torch.float32,
    )
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 80  # 10·hidden
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False


def test_prepare_teacher_refuses_fully_sharded_version_1_and_points_to_version_2():
    with pytest.raises(ValueError, match="fsdp_version: 2") as error:
        prepare_teacher(_Tiny(), _args(fsdp=True), _accelerator(fsdp=1))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("asked", ["argument", "accelerate-environment"])
def test_sharding_asked_for_but_running_as_ddp_is_refused_in_one_line(asked, monkeypatch):
    """On a machine without a GPU backend accelerate would silently train the run as DDP."""
    args = _args(fsdp="full_shard" if asked == "argument" else None)
    if asked == "accelerate-environment":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None), distributed_type="MULTI_CPU")
    with pytest.raises(ValueError, match="fsdp is set but accelerate runs this job as MULTI_CPU") as error:
        fsdp_version(args, accelerator)
    assert "\n" not in str(error.value)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert fsdp_version(_args(), accelerator) is None
    assert fsdp_version(_args(fsdp=True), _accelerator(fsdp=2)) == 2


def test_the_teachers_decoder_layer_class_is_its_own(models):
    from transformers import AutoModelForCausalLM

    qwen2 = AutoModelForCausalLM.from_pretrained(models / "qwen2_teacher")
    llama = AutoModelForCausalLM.from_pretrained(models / "student")
    assert [cls.__name__ for cls in decoder_layer_classes(qwen2)] == ["Qwen2DecoderLayer"]
    assert [cls.__name__ for cls in decoder_layer_classes(llama)] == ["LlamaDecoderLayer"]


@pytest.mark.parametrize("zero_stage", [None, 1, 2])
def test_prepare_teacher_replicates_without_zero3(zero_stage):
    teacher = _Tiny().train()
    accelerator = _accelerator(zero_stage=zero_stage, config={"zero_optimization": {"stage": zero_stage}})
    assert not is_zero3_enabled(accelerator)
    prepared = prepare_teacher(teacher, _args(teacher_dtype="bfloat16"), accelerator)
    assert prepared is teacher  # unwrapped: every rank holds the full frozen copy
    assert not prepared.training and not prepared.dropout.training
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in prepared.parameters())
    assert all(p.device.type == "cpu" for p in prepared.parameters())


def test_prepare_teacher_auto_dtype_follows_mixed_precision_and_keeps_fp32_otherwise():
    assert (
        next(prepare_teacher(_Tiny(), _args(bf16=True), _accelerator()).parameters()).dtype == torch.bfloat16
    )
    assert next(prepare_teacher(_Tiny(), _args(), _accelerator()).parameters()).dtype == torch.float32


def test_prepare_teacher_rejects_a_partitioned_teacher_outside_zero3():
    teacher = _Tiny()
    teacher.linear.weight.ds_id = 0  # what deepspeed.zero.Init leaves on a partitioned parameter
    with pytest.raises(ValueError, match="partitioned by DeepSpeed ZeRO-3"):
        prepare_teacher(teacher, _args(), _accelerator(zero_stage=2))


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group, as a launcher leaves one; destroyed afterwards if a test did not."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def barriers(monkeypatch) -> list[int]:
    calls: list[int] = []
    barrier = torch.distributed.barrier
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: (calls.append(1), barrier(*a, **k))[1])
    return calls


@pytest.mark.parametrize("wait_for_peers", [True, False])
def test_end_process_group_destroys_the_launchers_group(process_group, barriers, wait_for_peers):
    end_process_group(wait_for_peers=wait_for_peers)
    assert not torch.distributed.is_initialized()
    assert len(barriers) == int(wait_for_peers)


def test_end_process_group_without_a_group_does_nothing(barriers):
    assert not torch.distributed.is_initialized()
    end_process_group(wait_for_peers=True)
    assert not torch.distributed.is_initialized() and not barriers


def _finish(argv):
    return 0


def _fail(argv):
    raise ValueError("bad --field: pass a good one")


@pytest.mark.parametrize(("run", "exit_code", "barrier_calls"), [(_finish, 0, 1), (_fail, 1, 0)])
def test_cli_ends_the_process_group_before_exiting(
    process_group, barriers, monkeypatch, run, exit_code, barrier_calls
):
    monkeypatch.setitem(cli.COMMANDS, "train", cli.Command(run, "stand-in"))
    assert cli.main(["train"]) == exit_code
    assert not torch.distributed.is_initialized()
    assert len(barriers) == barrier_calls  # an error path does not wait for peers that may never come


# A script that reports what ran: an atexit handler, buffered output, and an object whose __del__ runs only
# if the interpreter shuts down. ``{call}`` ends it.
_EXIT_SCRIPT = """
import atexit, sys
import torch
atexit.register(lambda: print("atexit handler ran", flush=True))

class _Marker:
    def __del__(self):
        print("interpreter shut down", flush=True)

marker = _Marker()
print("buffered output", end="")
{call}
"""


def _run_exit_script(call: str, world_size: int) -> subprocess.CompletedProcess:
    env = {**launch_env(), "WORLD_SIZE": str(world_size)}
    script = _EXIT_SCRIPT.format(call=call)
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_exit_launched_process_runs_atexit_and_flushes_but_skips_interpreter_shutdown():
    # Interpreter shutdown is where a gloo worker thread taking the GIL aborts a finished rank (SIGABRT).
    call = "from distillens_trainer.commands.process import exit_launched_process\nexit_launched_process(3)"
    done = _run_exit_script(call, world_size=2)
    assert done.returncode == 3, done.stderr
    assert "buffered output" in done.stdout and "atexit handler ran" in done.stdout
    assert "interpreter shut down" not in done.stdout


@pytest.mark.parametrize(("world_size", "shuts_down"), [(1, True), (2, False)])
def test_the_distillens_command_skips_interpreter_shutdown_only_in_a_launched_rank(world_size, shuts_down):
    call = "sys.argv = ['distillens', 'train', '--no_such_flag']\nfrom distillens_trainer.cli import entry_point\n"
    done = _run_exit_script(call + "entry_point()", world_size=world_size)
    assert done.returncode == 2, done.stderr  # the usage error's exit code, either way
    assert "distillens train: error:" in done.stderr and "atexit handler ran" in done.stdout
    assert ("interpreter shut down" in done.stdout) == shuts_down


# --------------------------------------------------------------------------------------------- multi-process
distributed = pytest.mark.distributed
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")

# Per-step metrics compared with the single-process run. Measured on 2 CPU cores (fp32): at most
# 5e-7 absolute on losses around 2 and 1e-6 relative on grad norms, i.e. a few fp32 ulps, from the
# different reduction orders (2 x 2 vs 1 x 4 GEMMs, gloo all-reduce of the gradients, ZeRO's flat
# buffers), carried through 4 AdamW steps. rtol 1e-4 leaves room for other CPUs' kernels while staying
# far below what a real fault moves: the lens or KD term missing or wrongly scaled on a rank shifts
# these values by 1e-2 or more (the lens term alone is ~0.25 of a ~2 loss), and grad_norm exposes a
# gradient scaled by the number of processes, which AdamW's updates would hide.
STEP_KEYS = ("loss", "grad_norm", "kd_loss", "lens_loss", "ce_loss")
STEP_RTOL = 1e-4
# Token-weighted evaluation terms, same reasoning (no optimizer step involved: measured <= 2e-7 relative).
EVAL_KEYS = ("eval_ce_loss", "eval_kd_loss", "eval_lens_loss")


@pytest.fixture(scope="module")
def models(tiny_run_models) -> Path:
    return tiny_run_models


@pytest.fixture(scope="module")
def single(models, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("single")
    # The straightforward computation (head_chunk_size=0) is the reference; the distributed runs use the fused default.
    tiny.train(models, out, per_device_batch=4, steps=4, evaluate=True, head_chunk_size=0)
    return json.loads((out / "result.json").read_text()), out


@pytest.fixture(scope="module")
def zero2(models, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("zero2")
    deepspeed = str(ROOT / "examples" / "deepspeed" / "zero2.json")
    return torchrun(out, models, "--deepspeed", deepspeed, "--per-device-batch", "2", "--evaluate"), out


@pytest.fixture(scope="module")
def zero3(models, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("zero3")
    deepspeed = str(ROOT / "examples" / "deepspeed" / "zero3.json")
    extra = [
        "--deepspeed",
        deepspeed,
        "--per-device-batch",
        "2",
        "--evaluate",
        "--rouge",
        "--save-steps",
        "4",
    ]
    # Partition every tensor (the final norm too), so the lens really has to gather.
    extra += ["--zero3-persistence-threshold", "0"]
    return torchrun(out, models, *extra), out


@pytest.fixture(scope="module")
def accelerate_zero3(models, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("accelerate_zero3")
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    launcher += ["--config_file", str(ROOT / "examples" / "accelerate" / "deepspeed_zero3.yaml")]
    launcher += [
        "--num_processes",
        "2",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
    ]
    # The teacher as a model object with full weights: deepspeed.initialize partitions it (the other runs
    # pass a path, loaded already partitioned under zero.Init).
    return launch(launcher, out, models, "--per-device-batch", "2", "--teacher-object"), out


RUNS = ["zero2", "zero3", "accelerate_zero3"]


@distributed
@needs_deepspeed
@pytest.mark.parametrize("run", RUNS)
def test_per_step_metrics_match_single_process(run, single, request):
    result, _ = request.getfixturevalue(run)
    reference, _ = single
    assert result["world_size"] == 2
    got, want = logged_steps(result), logged_steps(reference)
    assert len(got) == len(want) == 4
    for step, (got_step, want_step) in enumerate(zip(got, want), start=1):
        for key in STEP_KEYS:
            assert got_step[key] == pytest.approx(want_step[key], rel=STEP_RTOL), f"step {step} {key}"


@distributed
@needs_deepspeed
@pytest.mark.parametrize("run", ["zero3", "accelerate_zero3"])
def test_zero3_teacher_is_a_partitioned_engine_and_the_lens_gathers(run, request):
    result, _ = request.getfixturevalue(run)
    assert result["zero3"] is True
    assert result["teacher_type"] == "DeepSpeedEngine"
    assert result["teacher_vocab_size"] == result["vocab_size"] == 64  # from ds_shape, not the empty shard
    checks = [result["teacher_lens_check"], result["student_lens_check"], result["teacher_lens_check_after"]]
    for check in checks:
        assert (
            check["head_local_numel"] == 0
        )  # the head is partitioned: the lens cannot work unless it gathers
        assert check["head_ds_shape"] == [64, tiny.HIDDEN_SIZE]
        # Same maths, same fp32 weights: exact in practice (measured 0.0).
        assert max(check["max_abs_diff"].values()) <= 1e-6
    if run == "zero3":  # persistence threshold 0: the final norm is partitioned as well
        assert all(check["norm_local_numel"] == 0 for check in checks)
    assert result["fused"] == {"lens": True, "output": True}  # the chunked path ran on the partitioned heads


@distributed
@needs_deepspeed
def test_zero2_teacher_is_replicated(zero2):
    result, _ = zero2
    assert result["zero3"] is False
    assert result["teacher_type"] == "LlamaForCausalLM"


@distributed
@needs_deepspeed
@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_saved_student_loads_and_matches(run, single, request):
    from transformers import AutoModelForCausalLM

    _, out = request.getfixturevalue(run)
    _, single_out = single
    student = AutoModelForCausalLM.from_pretrained(out / "student", dtype=torch.float32).eval()
    assert student.config.num_hidden_layers == tiny.STUDENT_LAYERS
    with torch.no_grad():
        logits = student(input_ids=tiny.probe_batch()).logits
    # The in-process model's logits on the same batch (gathered fp32 weights: measured 0.0 difference).
    torch.testing.assert_close(logits, torch.load(out / "probe_logits.pt"), rtol=0, atol=1e-6)
    # The single-process run's student: the same 4 steps up to fp32 reduction order (measured 3e-6 on
    # logits of magnitude ~10).
    torch.testing.assert_close(logits, torch.load(single_out / "probe_logits.pt"), rtol=1e-4, atol=1e-4)


def _assert_student_only(safetensors_path: Path, student_keys: set[str]) -> None:
    from safetensors import safe_open

    with safe_open(str(safetensors_path), "pt") as handle:
        keys = set(handle.keys())
    assert keys <= student_keys, f"{safetensors_path}: not the student's: {sorted(keys - student_keys)[:5]}"
    assert not any(f"layers.{tiny.STUDENT_LAYERS}." in key for key in keys)  # the teacher's extra layer


@distributed
@needs_deepspeed
@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_outputs_hold_no_teacher_weights(run, models, request):
    from transformers import AutoModelForCausalLM

    _, out = request.getfixturevalue(run)
    student_keys = set(AutoModelForCausalLM.from_pretrained(models / "student").state_dict())
    weight_files = sorted(out.rglob("*.safetensors"))
    assert weight_files
    for path in weight_files:
        _assert_student_only(path, student_keys)
    # DeepSpeed's own checkpoint (ZeRO-3 run, saved at step 4): the engine's parameters are the student's.
    for states in out.rglob("*model_states.pt"):
        checkpoint = torch.load(states, map_location="cpu", weights_only=False)
        shapes = checkpoint["param_shapes"]
        names = {name for group in (shapes if isinstance(shapes, list) else [shapes]) for name in group}
        assert names and names <= student_keys, f"{states}: {sorted(names - student_keys)[:5]}"
    assert run != "zero3" or any(out.rglob("*model_states.pt"))


@distributed
@needs_deepspeed
@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_evaluate_under_deepspeed(run, single, request):
    result, _ = request.getfixturevalue(run)
    reference, _ = single
    metrics, want = result["eval_metrics"], reference["eval_metrics"]
    for key in EVAL_KEYS:
        assert metrics[key] == pytest.approx(want[key], rel=STEP_RTOL), key
    # eval_loss itself is a mean of per-batch means, so it depends on how the 6 samples are split into
    # batches across processes; the token-weighted terms above do not.
    assert metrics["eval_loss"] == pytest.approx(want["eval_loss"], rel=5e-3)
    if run == "zero3":  # RougeEvalCallback: generation under ZeRO-3 (synced_gpus) on both ranks
        assert 0.0 <= metrics["eval_rougeL"] <= 100.0
        assert "eval_exact_match" in metrics


@distributed
def test_cli_train_under_torchrun_finishes_cleanly_and_reports_once(models, tmp_path):
    # DDP over gloo (--use_cpu: without it HF runs each CPU process on its own; DeepSpeed would need the test
    # helper's CPU shim): the CLI's own exit path under a launcher.
    command, out = cli_train_command(models, "teacher", tmp_path)
    train_file = tmp_path / "train.jsonl"
    log = tmp_path / "launch.log"
    run_logged(command, log)
    assert (out / "model.safetensors").exists()
    card = (out / "README.md").read_text(encoding="utf-8")  # the model card, written by the main process
    assert "distillens" in card and str(models / "teacher") in card and str(train_file) in card
    state = json.loads((out / "trainer_state.json").read_text())
    assert (state["global_step"], state["epoch"]) == (2, 1.0)  # 2 ranks x 2 rows: the 8 rows in 2 steps
    summaries = [line for line in log.read_text().splitlines() if line.startswith("distillens train:")]
    assert len(summaries) == 1, summaries  # the main process speaks for the run


# --------------------------------------------------------------------------------------------- on-policy
# --scripted: deterministic completions (train_tiny.scripted_completion), the same whatever the world size.
SCRIPTED = ["--lmbda", "1", "--max-new-tokens", "8", "--scripted"]
MIXED_SEED = 4  # window_is_on_policy(0.5, 4, step) for steps 0-3: off, on, on, off


def _rank_results(out: Path) -> list[dict]:
    return [json.loads((out / f"result_rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def single_on_policy(models, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("single_on_policy")
    on_policy = {"lmbda": 1.0, "max_new_tokens": 8, "scripted": True}  # as SCRIPTED
    tiny.train(models, out, per_device_batch=4, steps=4, head_chunk_size=0, **on_policy)
    return json.loads((out / "result.json").read_text()), out


@distributed
def test_both_ranks_draw_the_same_on_policy_window_decisions(models, tmp_path):
    extra = ["--lmbda", "0.5", "--max-new-tokens", "8", "--scripted", "--seed", str(MIXED_SEED)]
    result = torchrun(tmp_path, models, "--use-cpu", "--per-device-batch", "2", *extra)
    assert result["world_size"] == 2
    expected = [window_is_on_policy(0.5, MIXED_SEED, step) for step in range(4)]
    assert True in expected and False in expected  # the seed gives both kinds of window
    ranks = _rank_results(tmp_path)
    for rank in ranks:
        windows = rank["windows"]
        assert [window["step"] for window in windows] == [0, 1, 2, 3]
        assert [window["generated"] for window in windows] == expected, f"rank {rank['rank']}"
        assert [window["prompts"] for window in windows] == [2 if on else 0 for on in expected]
        assert rank["on_policy_fraction"] == [float(on) for on in expected]
    # The window's token count is the global one (summed across ranks), on- and off-policy alike.
    counts = [[window["num_items_in_batch"] for window in rank["windows"]] for rank in ranks]
    assert counts[0] == counts[1]


@distributed
def test_ddp_on_policy_normalisation_equals_the_single_process_one(models, single_on_policy, tmp_path):
    # 2 ranks x 2 rows vs 1 x 4 rows, the same scripted completions: the window's loss is normalised by the
    # generated tokens of all 4 rows only if each rank's recount is summed across ranks.
    result = torchrun(tmp_path, models, "--use-cpu", "--per-device-batch", "2", *SCRIPTED)
    reference, single_out = single_on_policy
    assert result["world_size"] == 2
    want_counts = [window["num_items_in_batch"] for window in reference["windows"]]
    for rank in _rank_results(tmp_path):
        assert [window["prompts"] for window in rank["windows"]] == [2, 2, 2, 2]
        assert [window["num_items_in_batch"] for window in rank["windows"]] == want_counts
    got, want = logged_steps(result), logged_steps(reference)
    assert len(got) == len(want) == 4
    for step, (got_step, want_step) in enumerate(zip(got, want), start=1):
        assert got_step["on_policy_fraction"] == want_step["on_policy_fraction"] == 1.0
        for key in STEP_KEYS:
            assert got_step[key] == pytest.approx(want_step[key], rel=STEP_RTOL), f"step {step} {key}"
    # The final student (as saved) against the single-process one, as in test_saved_student_loads_and_matches.
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = student(input_ids=tiny.probe_batch()).logits
    torch.testing.assert_close(logits, torch.load(tmp_path / "probe_logits.pt"), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, torch.load(single_out / "probe_logits.pt"), rtol=1e-4, atol=1e-4)


@distributed
@needs_deepspeed
def test_zero3_on_policy_run_samples_trains_and_saves(models, tmp_path):
    # Real sampling under ZeRO-3: the student's partitioned weights gathered once per window, generate with
    # synced_gpus on both ranks (a rank out of step would hang: run_logged ends it and fails).
    deepspeed = str(ROOT / "examples" / "deepspeed" / "zero3.json")
    extra = ["--deepspeed", deepspeed, "--per-device-batch", "2", "--steps", "3"]
    result = torchrun(tmp_path, models, *extra, "--lmbda", "1", "--max-new-tokens", "4")
    assert result["world_size"] == 2 and result["zero3"] is True
    steps = logged_steps(result)
    assert [entry["step"] for entry in steps] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([entry["loss"] for entry in steps])))
    assert all(entry["on_policy_fraction"] == 1.0 and entry["completion_length"] > 0 for entry in steps)
    ranks = _rank_results(tmp_path)
    for rank in ranks:
        assert [window["prompts"] for window in rank["windows"]] == [2, 2, 2]
        assert all(0 < length <= 4 for length in rank["completion_length"])
        # Each of the 4 completions holds 1 to 4 tokens, counted over both ranks.
        assert all(4 <= window["num_items_in_batch"] <= 16 for window in rank["windows"])
    assert ranks[0]["windows"] == ranks[1]["windows"]
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = student(input_ids=tiny.probe_batch()).logits
    torch.testing.assert_close(logits, torch.load(tmp_path / "probe_logits.pt"), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------- teacher cache
# An fp32 ``hidden`` cache of the tiny teacher (train_tiny.make_cache) holds the teacher's head inputs at every
# response token, so a run that reads it computes the same objective as the online teacher: its per-step metrics
# follow the single-process online run within the per-step tolerance above (measured on 2 CPU cores: <= 8e-7
# relative per step, <= 7e-8 on the evaluation terms, for DDP and ZeRO-3 alike: fp32 reduction order).


@pytest.fixture(scope="module")
def teacher_cache(models, tmp_path_factory) -> Path:
    """The cache, built once by the script's ``make-cache`` command (one process, as a user would)."""
    folder = tmp_path_factory.mktemp("teacher_cache") / "cache"
    command = [sys.executable, str(HELPER), "make-cache", str(models), str(folder)]
    command += ["--cache-mode", "hidden", "--cache-dtype", "float32"]
    run_logged(command, folder.parent / "make_cache.log")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["num_rows"] == tiny.NUM_TRAIN + tiny.NUM_EVAL
    return folder


@pytest.fixture(scope="module")
def student_only(models, tmp_path_factory) -> Path:
    """A models folder without the teacher: a run that tried to load it would fail."""
    directory = tmp_path_factory.mktemp("student_only")
    (directory / "student").symlink_to(models / "student", target_is_directory=True)
    return directory


def _assert_cached_run_matches_online(result: dict, out: Path, single: tuple[dict, Path]) -> None:
    reference, single_out = single
    assert result["world_size"] == 2
    assert result["teacher_type"] == "NoneType" and result["cached_teacher"] == "hidden"
    assert result["layer_map"] == reference["layer_map"] and result["vocab_size"] == reference["vocab_size"]
    for rank in _rank_results(out):  # both ranks read the cache
        assert rank["cached_teacher"] == "hidden", f"rank {rank['rank']}"
    got, want = logged_steps(result), logged_steps(reference)
    assert len(got) == len(want) == 4
    for step, (got_step, want_step) in enumerate(zip(got, want), start=1):
        for key in STEP_KEYS:
            assert got_step[key] == pytest.approx(want_step[key], rel=STEP_RTOL), f"step {step} {key}"
    metrics, want_metrics = result["eval_metrics"], reference["eval_metrics"]
    for key in EVAL_KEYS:  # the evaluation rows come from the cache too
        assert metrics[key] == pytest.approx(want_metrics[key], rel=STEP_RTOL), key
    # The saved student against the single-process online one, as in test_saved_student_loads_and_matches.
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "student", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = student(input_ids=tiny.probe_batch()).logits
    torch.testing.assert_close(logits, torch.load(out / "probe_logits.pt"), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, torch.load(single_out / "probe_logits.pt"), rtol=1e-4, atol=1e-4)


@distributed
def test_ddp_teacher_cache_run_follows_the_single_process_online_losses(
    student_only, teacher_cache, single, tmp_path
):
    extra = ["--use-cpu", "--per-device-batch", "2", "--evaluate", "--teacher-cache", str(teacher_cache)]
    result = torchrun(tmp_path, student_only, *extra)
    assert result["zero3"] is False
    _assert_cached_run_matches_online(result, tmp_path, single)


@distributed
@needs_deepspeed
def test_zero3_teacher_cache_run_follows_the_single_process_online_losses(
    student_only, teacher_cache, single, tmp_path
):
    # Every student tensor partitioned (threshold 0); the cached teacher head is whole on each rank.
    deepspeed = str(ROOT / "examples" / "deepspeed" / "zero3.json")
    extra = ["--deepspeed", deepspeed, "--zero3-persistence-threshold", "0", "--per-device-batch", "2"]
    extra += ["--evaluate", "--teacher-cache", str(teacher_cache)]
    result = torchrun(tmp_path, student_only, *extra)
    assert result["zero3"] is True
    assert result["student_lens_check"]["head_local_numel"] == 0  # the student's head really is partitioned
    assert max(result["student_lens_check"]["max_abs_diff"].values()) <= 1e-6
    _assert_cached_run_matches_online(result, tmp_path, single)


@distributed
def test_cache_teacher_under_torchrun_writes_each_ranks_shards_and_equals_one_process(models, tmp_path):
    from distillens_trainer.cli import main
    from distillens_trainer.teacher.cache.reader import TeacherCache

    rows = [
        {"instruction": f"Repeat w{i}", "input": "", "output": f"w{i} w{i + 1} w{i + 2}"} for i in range(10)
    ]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    flags = [
        "--model_name_or_path",
        str(models / "student"),
        "--teacher_model_name_or_path",
        str(models / "teacher"),
    ]
    flags += ["--train_file", str(train_file), "--prompt_template", "plain", "--max_length", "32"]
    flags += [
        "--max_prompt_length",
        "16",
        "--lens_num_layers",
        "2",
        "--rows_per_shard",
        "3",
        "--use_cpu",
        "true",
    ]
    flags += ["--cache_dtype", "float32", "--report_to", "none", "--disable_tqdm", "true"]
    launched, single = tmp_path / "launched", tmp_path / "single"
    log = tmp_path / "launch.log"
    run_logged(
        [
            *torchrun_launcher(),
            "-m",
            "distillens_trainer.cli",
            "cache-teacher",
            *flags,
            "--output_dir",
            str(launched),
        ],
        log,
    )
    summaries = [
        line for line in log.read_text().splitlines() if line.startswith("distillens cache-teacher:")
    ]
    assert len(summaries) == 1, summaries  # the main process speaks for the run
    assert main(["cache-teacher", *flags, "--output_dir", str(single)]) == 0
    one, two = TeacherCache.open(single), TeacherCache.open(launched)
    assert [shard["rows"] for shard in two.manifest["shards"]] == [
        3,
        3,
        3,
        1,
    ]  # shards 0, 2 by rank 0; 1, 3 by rank 1
    assert two.settings == one.settings and len(two) == len(one) == 10
    from distillens_trainer.data.arguments import DataArguments
    from distillens_trainer.data.building import build_datasets
    from distillens_trainer.data.collation import DataCollatorForCompletionOnly
    from distillens_trainer.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(models / "student"))
    data = DataArguments(
        train_file=str(train_file), prompt_template="plain", max_length=32, max_prompt_length=16
    )
    train, _ = build_datasets(data, tokenizer)
    batch = DataCollatorForCompletionOnly(tokenizer)(list(train))  # every row, in one padded batch
    for layer in one.settings.layers:
        torch.testing.assert_close(
            two.signals(batch, "cpu").head_inputs[layer], one.signals(batch, "cpu").head_inputs[layer]
        )
