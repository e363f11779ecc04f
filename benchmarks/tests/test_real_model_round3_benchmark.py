"""``benchmarks/real_model_round3.py``: the job plan, the warm start's identity and the report, without a real model."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import real_model_round3 as round3
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def _study(tmp_path: Path, **overrides) -> round3.Round3:
    """A round-3 study of the smoke preset over a tiny copy of the five evaluation sets."""
    data = tmp_path / "data"
    for file in [*round3.EVAL_SETS.values(), round3.TRAIN_FILE, round3.DEV_FILE]:
        (data / file).parent.mkdir(parents=True, exist_ok=True)
        rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(6)]
        (data / file).write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = round3.Round3Arguments(
        output_dir=str(tmp_path / "out"), preset="smoke", data_dir=str(data), bf16=False, **overrides
    )
    return round3.Round3(args, "test")


def _write(study: round3.Round3, name: str, record: dict) -> None:
    path = study.record_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _tiny_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    return LlamaForCausalLM(config)


def test_each_methods_sweep_is_followed_by_its_first_seed(tmp_path):
    jobs = [name for name, _ in _study(tmp_path).jobs()]
    # the swept models live in this session only: the first seed of a method runs right after its sweep
    for method in round3.OFF_POLICY:
        sweeps = [jobs.index(f"sweep_{method}_lr{lr:g}") for lr in (1e-4, 2e-4)]
        assert jobs.index(f"{method}_seed0") == max(sweeps) + 1
    # the other seeds of the off-policy methods come before the on-policy pair (one seed, last)
    assert max(jobs.index(f"{m}_seed1") for m in round3.OFF_POLICY) < jobs.index("sweep_kd_onpolicy_lr1e-05")
    assert jobs[-2:] == ["kd_onpolicy_seed0", "distillens_onpolicy_seed0"]
    assert len(jobs) == len(set(jobs))


def test_the_kinds_of_jobs_sample_only_the_first_seed_of_the_off_policy_methods(tmp_path):
    kinds = dict(_study(tmp_path).jobs())
    assert {name for name, kind in kinds.items() if kind == "run_sampled"} == {
        f"{m}_seed0" for m in round3.OFF_POLICY
    }


def test_allowing_a_retrained_start_leaves_the_settings_fingerprint_unchanged(tmp_path):
    strict = _study(tmp_path).args.fingerprint()
    assert _study(tmp_path, allow_retrained_start=True).args.fingerprint() == strict


@pytest.mark.parametrize("allowed", [False, True])
def test_a_warm_start_with_other_weights_than_its_record_stops_unless_allowed(tmp_path, allowed, caplog):
    study = _study(tmp_path, allow_retrained_start=allowed)
    _tiny_model(0).save_pretrained(study.root / "warm_start")
    recorded = round3.weights_digest(_tiny_model(1))
    _write(study, "init", {"weights_sha256": recorded, "cpu": "another CPU (model 1)"})
    if not allowed:
        with pytest.raises(ValueError, match="--allow_retrained_start true"):
            study.student_init()
        return
    with caplog.at_level(logging.WARNING):
        model = study.student_init()
    assert study.start_sha256 == round3.weights_digest(model) != recorded
    assert "differs from" in caplog.text


def test_a_warm_start_read_back_with_its_recorded_weights_is_the_start(tmp_path):
    study = _study(tmp_path)
    _tiny_model(0).save_pretrained(study.root / "warm_start")
    digest = round3.weights_digest(_tiny_model(0))
    _write(study, "init", {"weights_sha256": digest})
    study.student_init()
    assert study.start_sha256 == digest


def test_the_report_names_the_runs_trained_from_another_start(tmp_path):
    study = _study(tmp_path)
    _write(study, "init", {"weights_sha256": "a" * 64})
    _write(study, "sweep_kd_lr0.0001", {"start_sha256": "a" * 64})
    _write(study, "kd_seed1", {"start_sha256": "b" * 64})
    _write(study, "sft_seed1", {"start_sha256": "b" * 64})
    _write(study, "kd_ce_seed1", {})  # a record from before starts were named
    assert round3.starts_of(study) == {
        "init_sha256": "a" * 64,
        "other_starts": {"b" * 64: ["sft_seed1", "kd_seed1"]},
    }


def _score_start_study(tmp_path: Path, *, keep_start: bool) -> round3.Round3:
    """A study whose ``kd_seed1`` trained from a retrained start (the ``warm_start/`` here, if kept)."""
    study = _study(tmp_path, allow_retrained_start=True)
    retrained = _tiny_model(0)
    if keep_start:
        retrained.save_pretrained(study.root / "warm_start")
    _write(study, "init", {"weights_sha256": round3.weights_digest(_tiny_model(1)), "greedy": {}})
    _write(study, "kd_seed1", {"start_sha256": round3.weights_digest(retrained)})
    study.evaluate = lambda model, sampled: {"greedy": {"scored": round3.weights_digest(model)}}
    study.dev_rouge = lambda model: 12.5
    return study


def test_a_retrained_start_that_runs_trained_from_is_scored_once_as_its_own_row(tmp_path):
    study = _score_start_study(tmp_path, keep_start=True)
    digest = round3.weights_digest(_tiny_model(0))
    study.score_retrained_start()
    name = round3.retrained_start_name(digest)
    record = study.record(name)
    assert name == f"init_{digest[:12]}" and study.record_path(name).parent.name == "runs"
    assert record["weights_sha256"] == digest and record["greedy"] == {"scored": digest}
    assert record["dev_rougeL"] == 12.5  # what the sweeps trained from this start read against
    assert list(round3.records_by_method(study)) == ["init", name, "kd"]
    study.evaluate = lambda model, sampled: pytest.fail("scored twice")
    study.score_retrained_start()


def test_a_retrained_start_gone_with_its_session_is_not_scored(tmp_path):
    study = _score_start_study(tmp_path, keep_start=False)
    study.score_retrained_start()
    assert list(round3.records_by_method(study)) == ["init", "kd"]


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads /proc/cpuinfo (Linux)")
def test_the_cpu_model_names_the_processor_and_its_model_number():
    assert "(model " in round3.CPU_MODEL


def test_the_time_spent_adds_the_finished_jobs_per_kind_and_thread_count(tmp_path):
    study = _study(tmp_path)
    _write(study, "teacher_shipped", {"job_time_s": 1800.0, "threads": 1})
    _write(study, "sweep_kd_lr0.0001", {"job_time_s": 360.0, "threads": 2})
    _write(study, "sweep_kd_lr0.0002", {"job_time_s": 540.0, "threads": 2})
    assert round3.time_spent(study) == {
        "per_kind": {
            "eval_teacher @ 1 threads": {"jobs": 1, "hours": 0.5},
            "sweep @ 2 threads": {"jobs": 2, "hours": 0.25},
        },
        "hours": 0.75,
    }


def test_a_job_paused_for_a_measurement_counts_its_working_time(tmp_path):
    study = _study(tmp_path)
    _write(study, "sweep_kd_lr0.0001", {"job_time_s": 1560.0, "paused_s": 1020.0, "threads": 2})
    assert round3.time_spent(study)["per_kind"]["sweep @ 2 threads"] == {"jobs": 1, "hours": 0.15}


def test_the_time_spent_counts_the_scoring_of_a_retrained_start(tmp_path):
    study = _study(tmp_path)
    _write(study, "init", {"weights_sha256": "a" * 64})
    _write(study, "kd_seed1", {"start_sha256": "b" * 64, "job_time_s": 720.0, "threads": 2})
    _write(study, round3.retrained_start_name("b" * 64), {"job_time_s": 360.0, "threads": 2})
    spent = round3.time_spent(study)
    assert spent["per_kind"]["score_start @ 2 threads"] == {"jobs": 1, "hours": 0.1}
    assert spent["hours"] == 0.3


def test_a_warm_start_trained_again_inside_a_job_is_kept_out_of_that_jobs_working_time(tmp_path, monkeypatch):
    study = _study(tmp_path)
    monkeypatch.setattr(study, "jobs", lambda: [("kd_seed1", "run"), ("sft_seed1", "run")])

    def warm_up():  # the 200-step warm-up, in brief
        time.sleep(0.2)
        return _tiny_model(0), None

    monkeypatch.setattr(study, "warm_up", warm_up)
    monkeypatch.setattr(study, "job_run", lambda name: {"start": study.student_init() is not None})
    study.run()
    first, second = study.record("kd_seed1"), study.record("sft_seed1")
    assert first["warm_start_retrain_s"] >= 0.2 and "warm_start_retrain_s" not in second
    assert round3.working_seconds(first) == pytest.approx(first["job_time_s"] - first["warm_start_retrain_s"])


def test_the_reported_settings_leave_out_how_the_report_was_invoked(tmp_path):
    trained = _study(tmp_path, threads=2, commit_runs=True)
    reported = _study(tmp_path, threads=1, report_only=True)
    settings = reported.args.study_settings()
    assert settings == trained.args.study_settings()
    assert not round3.RUN_CONTROL & settings.keys()
    assert settings["lr_grid"] == reported.args.lr_grid and settings["steps"] == reported.args.steps
