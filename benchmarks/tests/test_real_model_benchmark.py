"""``benchmarks/real_model.py``: presets, resumable jobs, settings guard and the summary, without loading models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import real_model
import torch  # benchmarks/ is on sys.path: pytest's `pythonpath` in pyproject.toml


def _args(tmp_path: Path, **overrides) -> real_model.RealModelArguments:
    return real_model.RealModelArguments(output_dir=str(tmp_path), preset="smoke", bf16=False, **overrides)


def _write_run(
    args, method: str, seed: int | None, rouge: float, exact_match: float, output_jsd: float = 0.2
) -> None:
    run = {"method": method, "seed": seed, "rougeL": rouge, "exact_match": exact_match}
    if method != "teacher":
        run["lens"] = {
            "pairs": [[1, 3], [2, 6]],
            "divergence": [0.4, 0.2],
            "final": output_jsd,
            "student_ce": 3.0,
        }
    path = real_model.run_file(args, method, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run))


def test_command_line_values_win_over_the_preset():
    args = real_model.RealModelArguments(output_dir="x", preset="round2", steps=7, methods=["kd"])
    assert args.steps == 7 and args.methods == ["kd"]
    assert args.seeds == [0, 1, 2] and args.num_test == 200 and args.student_layers == 14
    assert real_model.RealModelArguments(output_dir="x", preset="round2").methods == [
        "sft", "kd", "distillens", "distillens_w5", "distillens_shrunk", "kd_onpolicy", "distillens_onpolicy"
    ]  # fmt: skip
    assert real_model.RealModelArguments(output_dir="x").student_layers == 10  # round 1's settings stay


def test_bf16_generation_needs_bf16_and_leaves_round_one_fingerprints_unchanged():
    round2 = real_model.RealModelArguments(output_dir="x", preset="round2", bf16=True)
    assert round2.bf16_generation and round2.fingerprint()["bf16_generation"] is True
    assert not real_model.RealModelArguments(output_dir="x", preset="round2", bf16=False).bf16_generation
    round1 = real_model.RealModelArguments(output_dir="x", bf16=True)
    assert not round1.bf16_generation and "bf16_generation" not in round1.fingerprint()


def test_method_variants_are_their_objective_with_config_overrides(tmp_path):
    args = _args(tmp_path, lens_weight=1.0)
    objective, overrides = real_model.method_settings("distillens_onpolicy", args)
    assert objective == real_model.OBJECTIVES["distillens"]
    assert overrides["lmbda"] == 1.0 and overrides["max_new_tokens"] == args.max_new_tokens
    assert real_model.method_settings("distillens_w5", args)[1]["lens_weight"] == 5.0
    assert real_model.method_settings("distillens_shrunk", args)[1]["lens_layer_map"] == "shrunk"
    objective, overrides = real_model.method_settings("kd_onpolicy", args)
    assert objective["lens_weight"] == 0.0 and "lens_weight" not in overrides and overrides["lmbda"] == 1.0
    assert "lmbda" not in real_model.method_settings("kd", args)[1]


def test_a_rebuilt_warm_start_must_reproduce_the_recorded_weights(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    args = _args(tmp_path)
    monkeypatch.setattr(real_model, "train", lambda *a, **k: type("Run", (), {"train_time_s": 0.0}))
    torch.manual_seed(0)
    _, info = real_model.warm_start(LlamaForCausalLM(config), None, None, args)
    assert len(info["weights_sha256"]) == 64
    for name in ("config.json", "model.safetensors"):  # the weights are not committed, their digest is
        (tmp_path / "warm_start" / name).unlink()
    torch.manual_seed(0)
    assert (
        real_model.warm_start(LlamaForCausalLM(config), None, None, args)[1] == info
    )  # the same start again
    (tmp_path / "warm_start" / "config.json").unlink()
    torch.manual_seed(1)
    with pytest.raises(ValueError, match="gave other weights than the one its runs started from"):
        real_model.warm_start(LlamaForCausalLM(config), None, None, args)


def test_greedy_teacher_and_init_run_once_and_finished_runs_are_skipped(tmp_path):
    args = _args(tmp_path, seeds=[0, 1], methods=["kd", "distillens"])
    jobs = real_model.jobs_of(args)
    assert jobs == [
        ("teacher", None),
        ("init", None),
        ("kd", 0),
        ("distillens", 0),
        ("kd", 1),
        ("distillens", 1),
    ]
    _write_run(args, "teacher", None, 20.0, 5.0)
    _write_run(args, "kd", 0, 10.0, 2.0)
    assert real_model.pending_jobs(args) == [("init", None), ("distillens", 0), ("kd", 1), ("distillens", 1)]
    sampled = _args(tmp_path, seeds=[0, 1], methods=["kd"], do_sample=True)
    assert real_model.jobs_of(sampled)[:2] == [("teacher", 0), ("teacher", 1)]


def test_the_summary_pairs_each_method_with_kd_by_seed(tmp_path):
    args = _args(tmp_path, seeds=[0, 1, 2], methods=["kd", "distillens"])
    _write_run(args, "teacher", None, 20.0, 5.0)
    for seed, (kd, dl) in enumerate([(10.0, 11.0), (12.0, 14.0), (11.0, 14.0)]):
        _write_run(args, "kd", seed, kd, 1.0, output_jsd=0.2)
        _write_run(args, "distillens", seed, dl, 1.0, output_jsd=0.2 - 0.0001 * (seed + 1))
    summary = real_model.summarise(args, real_model.runs_by_method(args))
    teacher = summary["methods"]["teacher"]
    assert teacher["rougeL"]["per_seed"] == [20.0, 20.0, 20.0] and "lens_jsd" not in teacher
    assert summary["methods"]["distillens"]["rougeL"]["mean"] == pytest.approx(13.0)
    diff = summary["paired"]["distillens - kd"]["rougeL"]
    # differences 1, 2, 3: mean 2, sample std 1, t_{0.975, 2} = 4.303 -> half width 4.303 / sqrt(3) = 2.484
    assert diff["per_seed"] == [1.0, 2.0, 3.0] and diff["ci95"] == pytest.approx([-0.484, 4.484], abs=2e-3)
    lens = summary["methods"]["kd"]["lens_jsd"]
    assert lens["relative_depth"] == [0.5, 1.0] and lens["mean"] == [0.4, 0.2]
    # teacher-forced scores: means per method, and paired differences kept to 5 decimals (JSD moves by 1e-3)
    assert summary["methods"]["kd"]["validation_ce"]["mean"] == 3.0 and "output_jsd" not in teacher
    jsd = summary["paired"]["distillens - kd"]["output_jsd"]
    assert jsd["per_seed"] == pytest.approx([-0.0001, -0.0002, -0.0003]) and jsd["mean"] == pytest.approx(
        -0.0002
    )
    table = real_model.markdown({"command": "c", **summary})
    assert jsd["ci95"] == pytest.approx([-0.00045, 0.00005], abs=1e-5)  # 4.303 * 0.0001 / sqrt(3) = 0.00025
    assert "| distillens - kd | +2.00 [-0.48, +4.48] | +0.00 [+0.00, +0.00] | -0.0002 [" in table
    assert "| teacher | 20.00 ± 0.00 | 5.00 ± 0.00 | - | - | 3 |" in table


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    real_model.check_settings(_args(tmp_path))
    real_model.check_settings(_args(tmp_path, seeds=[0, 1, 2]))  # more seeds: the same experiment, resumed
    with pytest.raises(ValueError, match="holds runs with other settings"):
        real_model.check_settings(_args(tmp_path, steps=3))


def test_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match="methods: unknown"):
        real_model.RealModelArguments(output_dir="x", methods=["feature"])


def test_teacher_cache_methods_pair_with_the_chosen_baseline(tmp_path):
    methods = ["distillens_hidden", "distillens_topk8"]
    args = _args(tmp_path, seeds=[0, 1], methods=methods, baseline="distillens_hidden")
    assert real_model.OBJECTIVES["distillens_topk8"] == real_model.OBJECTIVES["distillens"]
    for seed in (0, 1):
        _write_run(args, "distillens_hidden", seed, 10.0, 1.0, output_jsd=0.2)
        _write_run(args, "distillens_topk8", seed, 9.0 + seed, 1.0, output_jsd=0.25)
    paired = real_model.summarise(args, real_model.runs_by_method(args))["paired"]
    assert list(paired) == ["distillens_topk8 - distillens_hidden"]
    assert paired["distillens_topk8 - distillens_hidden"]["output_jsd"]["mean"] == pytest.approx(0.05)


def test_a_partial_report_lists_the_runs_still_to_do_and_each_methods_samples(tmp_path):
    args = _args(tmp_path, seeds=[0, 1], methods=["kd"])
    _write_run(args, "teacher", None, 20.0, 5.0)
    _write_run(args, "kd", 0, 10.0, 2.0)
    kd_run = real_model.run_file(args, "kd", 0)
    kd_run.write_text(
        json.dumps(json.loads(kd_run.read_text()) | {"samples": [{"prompt": "Q?", "response": "A."}]})
    )
    report = real_model.write_report(args, "c", {"kept_layers": [0, 2]})
    assert report["pending"] == [["init", None], ["kd", 1]]
    assert report["samples"]["kd"] == [{"prompt": "Q?", "response": "A."}]
    text = (tmp_path / "results.md").read_text()
    assert "Still to run (2): init (seed all), kd (seed 1)." in text and "- **kd** — *Q?* → A." in text
    assert json.loads((tmp_path / "results.json").read_text())["methods"]["kd"]["rougeL"]["per_seed"] == [
        10.0
    ]
