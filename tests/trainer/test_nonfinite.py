"""The non-finite guard: non-finite or degenerate settings refused, non-finite weights refused before training,
training stopped (or the step skipped) at the first non-finite loss, term or gradient norm, and lens.json valid."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from distillens_demo.data.suite import format_example, generate_examples, train_suite_tokenizer
from distillens_trainer import DistillLensConfig, DistillLensTrainer
from distillens_trainer.cli import main
from distillens_trainer.loss.heads import LinearHead
from distillens_trainer.loss.spec import MIN_TEMPERATURE, ObjectiveSpec
from distillens_trainer.loss.teacher_signals import CachedHeadInputs
from distillens_trainer.trainer.nonfinite import NonFiniteTrainingError, nonfinite_sources
from distillens_trainer.trainer.setup import refuse_nonfinite_cached_head

from conftest import pad_batch, tiny_llama, token_rows

NAN, INF = float("nan"), float("inf")


def _config(tmp_path: Path, **overrides) -> DistillLensConfig:
    settings = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "max_steps": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "lens_num_layers": 1,
        "seed": 0,
        "disable_tqdm": True,
    }
    return DistillLensConfig(**(settings | overrides))


def _trainer(tmp_path: Path, student=None, teacher=None, **overrides) -> DistillLensTrainer:
    return DistillLensTrainer(
        model=student if student is not None else tiny_llama(num_layers=2, hidden=32, seed=1),
        teacher_model=teacher if teacher is not None else tiny_llama(num_layers=4, hidden=32, seed=2),
        args=_config(tmp_path, **overrides),
        train_dataset=Dataset.from_list(token_rows(32)),
        data_collator=pad_batch,
    )


def _nan_outputs_from(model: torch.nn.Module, first_call: int, last_call: int | None = None) -> None:
    """From its ``first_call``-th forward on a batch (1-based) to its ``last_call``-th, ``model`` returns NaN
    logits and hidden states (its weights stay finite)."""
    calls = {"n": 0}

    def hook(_module, _args, kwargs, output):
        if "attention_mask" not in kwargs:  # a probe of the objective's, not a training batch
            return output
        calls["n"] += 1
        if calls["n"] >= first_call and (last_call is None or calls["n"] <= last_call):
            output.logits = output.logits * NAN
            if output.hidden_states is not None:
                output.hidden_states = tuple(state * NAN for state in output.hidden_states)
        return output

    model.register_forward_hook(hook, with_kwargs=True)


def _with_nan_weight(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = NAN
    return model


class _WeightsAtEachStep(TrainerCallback):
    """A copy of one student weight after every optimizer step."""

    def __init__(self, parameter: torch.nn.Parameter) -> None:
        self.parameter, self.after_step = parameter, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step[state.global_step] = self.parameter.detach().clone()


# ------------------------------------------------------------------------------- settings refused
@pytest.mark.parametrize("value", [NAN, INF])
@pytest.mark.parametrize("name", ["ce_weight", "kd_weight", "lens_weight", "feature_weight"])
def test_a_non_finite_loss_weight_is_refused_as_not_finite_not_as_negative(name, value):
    with pytest.raises(
        ValueError, match=rf"^{name}={value} is not a finite number: loss weights must be finite"
    ):
        ObjectiveSpec(**{name: value})


def test_a_weight_beyond_float32_is_refused_because_the_weighted_loss_would_be_infinite():
    with pytest.raises(ValueError, match=r"^kd_weight=1e\+39 is not a finite number"):
        ObjectiveSpec(kd_weight=1e39)


@pytest.mark.parametrize("temperature", [1e-30, 1e-3, 0.009, INF])
def test_a_degenerate_temperature_is_refused_with_the_reason(temperature):
    with pytest.raises(ValueError, match=rf"^temperature={temperature} ") as raised:
        ObjectiveSpec(temperature=temperature)
    assert "finite" in str(raised.value) or "1/temperature" in str(raised.value)


def test_the_lowest_temperature_is_accepted():
    assert ObjectiveSpec(temperature=MIN_TEMPERATURE).temperature == MIN_TEMPERATURE


def test_below_the_temperature_floor_the_loss_grows_while_its_gradient_vanishes():
    """Why MIN_TEMPERATURE: on LM-like logits (Gaussian, std 3, 32k tokens) the reverse KL's gradient collapses
    below it, while the loss keeps growing as 1/T (float64, so the test is about the maths, not rounding)."""
    from distillens_trainer.loss.divergences import token_divergence

    generator = torch.Generator().manual_seed(0)
    student = torch.randn(16, 32000, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(16, 32000, generator=generator, dtype=torch.float64) * 3
    measured = {}
    for temperature in (1.0, MIN_TEMPERATURE, 1e-30):
        logits = student.clone().requires_grad_(True)
        loss = token_divergence("rkl", logits, teacher, temperature=temperature).mean()
        loss.backward()
        measured[temperature] = (loss.item(), logits.grad.norm().item())
    assert measured[1e-30][0] > 1e3 * measured[1.0][0]
    assert measured[MIN_TEMPERATURE][1] > measured[1.0][1] > 0
    assert measured[1e-30][1] == 0.0


@pytest.mark.parametrize("learning_rate", [NAN, INF, 0.0, -1e-4])
def test_a_non_finite_or_non_positive_learning_rate_is_refused(tmp_path, learning_rate):
    with pytest.raises(ValueError, match=rf"^learning_rate={learning_rate} must be a finite number > 0"):
        _config(tmp_path, learning_rate=learning_rate)


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        (dict(weight_decay=NAN), "weight_decay=nan must be a finite number"),
        (dict(max_grad_norm=NAN), "max_grad_norm=nan must be a number >= 0"),
        (dict(label_smoothing_factor=NAN), "label_smoothing_factor=nan must lie in [0, 1)"),
        (dict(label_smoothing_factor=1.0), "label_smoothing_factor=1.0 must lie in [0, 1)"),
    ],
    ids=["weight_decay_nan", "max_grad_norm_nan", "label_smoothing_nan", "label_smoothing_1"],
)
def test_other_non_finite_optimisation_settings_are_refused(tmp_path, setting, words):
    with pytest.raises(ValueError) as raised:
        _config(tmp_path, **setting)
    assert str(raised.value).startswith(words)


def test_zero_gradient_accumulation_steps_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^gradient_accumulation_steps=0 must be >= 1"):
        _config(tmp_path, gradient_accumulation_steps=0)


def test_an_unknown_nonfinite_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^nonfinite_policy='ignore' must be one of stop, skip\.$"):
        _config(tmp_path, nonfinite_policy="ignore")


def test_skipping_steps_is_refused_under_deepspeed(tmp_path):
    with pytest.raises(ValueError, match=r"^nonfinite_policy='skip' cannot drop an update under DeepSpeed"):
        _config(tmp_path, nonfinite_policy="skip", deepspeed={"train_micro_batch_size_per_gpu": "auto"})


# ------------------------------------------------------------------------------- weights refused at setup
def test_a_nan_teacher_weight_is_refused_before_training(tmp_path):
    with pytest.raises(
        ValueError, match=r"^the teacher's weights hold non-finite values \(NaN or inf: 1 of "
    ):
        _trainer(tmp_path, teacher=_with_nan_weight(tiny_llama(num_layers=4, hidden=32, seed=2)))


def test_a_nan_student_weight_is_refused_before_the_teacher_loads(tmp_path, monkeypatch):
    from distillens_trainer.trainer import distillens_trainer as module

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was resolved before the student's weights were checked")

    monkeypatch.setattr(module, "resolve_teacher", no_teacher)
    with pytest.raises(
        ValueError, match=r"^the student's weights hold non-finite values .*model\.layers\.0\.mlp"
    ):
        _trainer(tmp_path, student=_with_nan_weight(tiny_llama(num_layers=2, hidden=32, seed=1)))


# ------------------------------------------------------------------------------- the guard during training
def test_non_finite_teacher_outputs_stop_training_at_that_step_and_keep_the_last_checkpoint(tmp_path):
    teacher = tiny_llama(num_layers=4, hidden=32, seed=2)
    _nan_outputs_from(teacher, first_call=3)  # finite weights, non-finite outputs from step 3
    trainer = _trainer(tmp_path, teacher=teacher, save_strategy="steps", save_steps=1)
    weight = trainer.model.model.layers[0].mlp.up_proj.weight
    record = _WeightsAtEachStep(weight)
    trainer.add_callback(record)
    with pytest.raises(NonFiniteTrainingError) as raised:
        trainer.train()
    line = str(raised.value)
    assert "\n" not in line and isinstance(raised.value, ValueError)
    assert line.startswith("training stopped at step 3: loss=nan, kd_loss=nan")
    assert "from the teacher's outputs (logits:" in line and "no final model is saved" in line
    assert trainer.state.global_step == 2 and sorted(record.after_step) == [1, 2]
    assert torch.equal(weight, record.after_step[2])  # step 3's update was not applied
    assert torch.isfinite(weight).all()
    checkpoints = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_non_finite_student_outputs_from_finite_weights_are_named(tmp_path):
    student = tiny_llama(num_layers=2, hidden=32, seed=1)
    _nan_outputs_from(student, first_call=1)
    trainer = _trainer(tmp_path, student=student, lens_weight=0.0)
    with pytest.raises(
        NonFiniteTrainingError, match=r"^training stopped at step 1: .*from the student's outputs \("
    ):
        trainer.train()


def test_infinite_gradients_with_a_finite_loss_stop_training_naming_them(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.model.lm_head.weight.register_hook(lambda grad: torch.full_like(grad, INF))
    with pytest.raises(NonFiniteTrainingError) as raised:
        trainer.train()
    line = str(raised.value)
    assert line.startswith(
        "training stopped at step 1: the gradients are not finite (2,048 of 2,048 values of lm_head.weight) while "
        "the loss and its terms are: an exploding update"
    )
    assert trainer.state.global_step == 0


def test_skipped_steps_apply_no_update_are_counted_and_never_log_a_loss_of_zero(tmp_path, caplog):
    teacher = tiny_llama(num_layers=4, hidden=32, seed=2)
    _nan_outputs_from(teacher, first_call=2, last_call=2)  # only step 2 is non-finite
    trainer = _trainer(tmp_path, teacher=teacher, nonfinite_policy="skip")
    weight = trainer.model.model.layers[0].mlp.up_proj.weight
    record = _WeightsAtEachStep(weight)
    trainer.add_callback(record)
    result = trainer.train()
    assert torch.equal(record.after_step[2], record.after_step[1])  # step 2: no update
    assert not torch.equal(record.after_step[3], record.after_step[2])
    logs = {entry["step"]: entry for entry in trainer.state.log_history if "skipped_steps" in entry}
    assert "loss" not in logs[2] and logs[2]["skipped_steps"] == 1
    for step in (1, 3, 4):
        assert (
            logs[step]["skipped_steps"] == 0 and math.isfinite(logs[step]["loss"]) and logs[step]["loss"] > 0
        )
    applied = [logs[step]["loss"] for step in (1, 3, 4)]
    assert result.metrics["train_skipped_steps"] == 1
    assert result.training_loss == pytest.approx(sum(applied) / 3, rel=1e-5)
    assert any("skipped step 2: loss=nan" in message for message in caplog.messages)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_skipping_still_stops_once_the_student_weights_are_non_finite(tmp_path):
    trainer = _trainer(tmp_path, nonfinite_policy="skip")

    class PoisonBeforeStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                _with_nan_weight(model)

    trainer.add_callback(PoisonBeforeStep2())
    with pytest.raises(
        NonFiniteTrainingError, match=r"^training stopped at step 2: .*the student's weights \(1 of "
    ):
        trainer.train()


def test_a_non_finite_lm_head_in_a_teacher_cache_is_refused_before_training():
    head = LinearHead(weight=torch.tensor([[1.0, INF], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"^the teacher cache C holds a non-finite LM head \(teacher_head"):
        refuse_nonfinite_cached_head(head, "C")


def test_the_source_is_the_cache_signals_or_else_the_objective_itself():
    student = tiny_llama(num_layers=2, hidden=32, seed=1)
    signals = CachedHeadInputs(
        output_layer=4, head_inputs={4: torch.tensor([[1.0, NAN], [0.0, 1.0]])}, where="C"
    )
    sources, student_weights = nonfinite_sources(student=student, student_outputs=None, teacher=signals)
    assert (
        sources == ["the teacher cache's signals (C: layer 4 head inputs: 1 non-finite)"]
        and not student_weights
    )
    sources, _ = nonfinite_sources(student=student, student_outputs=None)
    assert sources[0].startswith("the objective itself")


# ------------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nonfinite")
    examples = generate_examples(24, seed=0)
    tokenizer = train_suite_tokenizer([format_example(e) for e in examples], vocab_size=300)
    models = {
        "student": tiny_llama(num_layers=2, vocab=len(tokenizer), seed=1),
        "teacher": tiny_llama(num_layers=4, vocab=len(tokenizer), seed=2),
        "nan_teacher": _with_nan_weight(tiny_llama(num_layers=4, vocab=len(tokenizer), seed=2)),
        "nan_student": _with_nan_weight(tiny_llama(num_layers=2, vocab=len(tokenizer), seed=1)),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = [{key: e[key] for key in ("instruction", "input", "output")} for e in examples]
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def _train_argv(root: Path, output_dir: Path, *extra: str, teacher: str = "teacher") -> list[str]:
    return [
        "train", "--model_name_or_path", str(root / "student"), "--train_file", str(root / "train.jsonl"),
        "--teacher_model_name_or_path", str(root / teacher), "--output_dir", str(output_dir),
        "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_length", "256",
        "--max_prompt_length", "200", "--lens_num_layers", "1", "--report_to", "none", "--use_cpu", "true",
        "--save_strategy", "no", *extra,
    ]  # fmt: skip


def _one_error_line(capsys) -> str:
    stderr = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in stderr if line.startswith("distillens train: error:")]
    assert len(errors) == 1 and stderr[-1] == errors[0], stderr
    return errors[0]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--kd_weight", "nan"], "kd_weight=nan is not a finite number"),
        (["--lens_weight", "inf"], "lens_weight=inf is not a finite number"),
        (["--temperature", "1e-30"], "temperature=1e-30 is below 0.01"),
        (["--learning_rate", "nan"], "learning_rate=nan must be a finite number > 0"),
        (["--learning_rate", "0"], "learning_rate=0.0 must be a finite number > 0"),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps=0 must be >= 1"),
    ],
    ids=[
        "kd_weight_nan",
        "lens_weight_inf",
        "temperature_tiny",
        "learning_rate_nan",
        "learning_rate_0",
        "ga_0",
    ],
)
def test_a_non_finite_or_degenerate_setting_is_one_line_and_exit_1(workspace, tmp_path, capsys, extra, words):
    output_dir = tmp_path / "run"
    assert main(_train_argv(workspace, output_dir, *extra)) == 1
    assert words in _one_error_line(capsys)
    assert not output_dir.exists() or not any(output_dir.iterdir())


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_train_with_a_nan_weight_exits_non_zero_with_one_line_and_writes_no_model(
    workspace, tmp_path, capsys, which
):
    output_dir = tmp_path / "run"
    argv = _train_argv(workspace, output_dir, teacher="nan_teacher" if which == "teacher" else "teacher")
    if which == "student":
        argv[argv.index("--model_name_or_path") + 1] = str(workspace / "nan_student")
    assert main(argv) == 1
    assert f"the {which}'s weights hold non-finite values" in _one_error_line(capsys)
    assert not list(output_dir.rglob("*.safetensors"))


def test_lens_json_holds_null_where_a_value_is_not_finite(workspace, tmp_path, capsys, caplog):
    output_dir = tmp_path / "lens"
    argv = ["lens", "--model_name_or_path", str(workspace / "nan_student"), "--data_file"]
    argv += [str(workspace / "train.jsonl"), "--output_dir", str(output_dir), "--max_samples", "4"]
    argv += ["--device", "cpu", "--teacher_model_name_or_path", str(workspace / "teacher")]
    assert main(argv) == 0, capsys.readouterr().err

    def refuse(constant: str):
        raise AssertionError(f"lens.json holds {constant}, which is not JSON")

    report = json.loads((output_dir / "lens.json").read_text(), parse_constant=refuse)
    assert report["student"]["entropy"][-1] is None  # the NaN student's own output distribution
    assert any(
        "are not finite (NaN or inf" in message and "written as null" in message
        for message in caplog.messages
    )


def test_a_run_that_turns_non_finite_stops_in_one_line_keeping_its_checkpoint_and_writing_no_model(
    workspace, tmp_path, capsys
):
    output_dir = tmp_path / "run"
    extra = ["--learning_rate", "1e30", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "1"]
    assert main(_train_argv(workspace, output_dir, *extra)) == 1
    line = _one_error_line(capsys)
    assert "training stopped at step 2: " in line and "from the student's" in line, line
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (output_dir / "model.safetensors").exists()
