"""``benchmarks/lens_memory.py`` and ``benchmarks/trainer_steps.py``: extrapolation and goal ratios,
by hand on made-up measurements (no timing, no subprocess); ``benchmarks/lens_profile_speed.py`` on a tiny pair."""

from __future__ import annotations

import argparse
import json

import lens_memory  # benchmarks/ is on sys.path: pytest's `pythonpath` in pyproject.toml
import pytest
import trainer_steps


def _memory_point(tokens: int, fused_mib: float, straightforward_mib: float | None) -> dict:
    straightforward = {"skipped": "predicted too large"}
    if straightforward_mib is not None:
        straightforward = {"peak_mib": straightforward_mib}
    return {
        "section": "memory",
        "vocab": 1000,
        "tokens": tokens,
        "hidden": 8,
        "variants": {"straightforward": straightforward, "fused": {"peak_mib": fused_mib}},
    }


def test_skipped_peaks_are_extrapolated_on_the_line_through_the_measured_ones_and_labelled():
    points = [
        _memory_point(128, 50.0, 110.0),
        _memory_point(256, 52.0, 210.0),
        _memory_point(1024, 55.0, None),
        _memory_point(2048, 60.0, None),
    ]
    lens_memory.extrapolate(points)
    entry = points[2]["variants"]["straightforward"]
    assert entry["peak_mib_extrapolated"] == pytest.approx(10.0 + 1024 * 100 / 128)  # y = 10 + N·100/128
    assert entry["extrapolated_from_tokens"] == [128, 256]
    goals = lens_memory.goals(argparse.Namespace(memory_vocab=1000), points)
    assert goals["memory_fused_vs_straightforward_V1000_N128"] == pytest.approx(50 / 110)
    assert goals["memory_fused_vs_straightforward_V1000_N1024_extrapolated"] == pytest.approx(55 / 810)
    # flatness counts measured fused peaks from 1024 tokens on only
    assert goals["memory_fused_max_over_min_N1024_2048"] == pytest.approx(60 / 55)


def test_predicted_peaks_grow_with_tokens_for_the_straightforward_path_only():
    opts = argparse.Namespace(pairs=5, chunk_size=1024)
    straight = [lens_memory.predicted_peak_mib(opts, "straightforward", 128256, n, 256) for n in (1024, 4096)]
    fused = [lens_memory.predicted_peak_mib(opts, "fused", 128256, n, 256) for n in (1024, 4096)]
    assert straight[1] > 3.5 * straight[0]
    assert fused[1] < 1.1 * fused[0]


def test_trainer_goals_are_the_ratios_of_the_issue():
    def entry(median: float) -> dict:
        return {"step_s": {"median": median}}

    variants = {
        "trainer": entry(1.0),
        "sft": entry(1.05),
        "kd_fused": entry(2.0),
        "gkd": entry(2.5),
        "distillens_fused": entry(3.45),
        "floor": entry(1.0),
        "kd": {"skipped": "no"},
    }
    goals = trainer_steps.goals(variants)
    assert goals == pytest.approx(
        {"distillens_fused_vs_kd_plus_floor": 1.15, "kd_fused_vs_gkd": 0.8, "sft_vs_trainer": 1.05}
    )


def test_trainer_steps_cache_goals_compare_each_cache_variant_with_its_online_counterpart():
    def entry(median: float, peak_mib: float, **extra) -> dict:
        return {"step_s": {"median": median}, "peak_rss_mb": peak_mib, **extra}

    body = 100 * 1024 * 1024
    variants = {
        "kd_fused": entry(2.0, 1000.0, teacher_body_bytes=body),
        "distillens_fused": entry(4.0, 1200.0, teacher_body_bytes=body),
        "kd_cache_hidden": entry(1.5, 880.0),
        "distillens_cache_hidden": entry(3.0, 1050.0),
        # no online counterpart's teacher: the cache build's teacher is the reference
        "distillens_cache_topk": entry(2.0, 1100.0, cache_build_teacher={"teacher_body_bytes": 2 * body}),
    }
    goals = trainer_steps.goals(variants)
    assert goals == pytest.approx(
        {
            "kd_cache_hidden_vs_kd_fused": 0.75,
            "kd_cache_hidden_peak_saving_over_teacher_body": 1.2,
            "distillens_cache_hidden_vs_distillens_fused": 0.75,
            "distillens_cache_hidden_peak_saving_over_teacher_body": 1.5,
            "distillens_cache_topk_vs_distillens_fused": 0.5,
            "distillens_cache_topk_peak_saving_over_teacher_body": 1.0,  # the online trainer's teacher
        }
    )


def test_trainer_steps_cache_variants_are_opt_in_and_quick_results_stay_out_of_the_results_folder():
    opts = trainer_steps.parse_args(["--quick"])
    assert opts.variants == list(trainer_steps.VARIANTS)
    assert not set(opts.variants) & set(trainer_steps.CACHE_VARIANTS)
    assert opts.out_dir != trainer_steps.RESULTS_DIR
    assert trainer_steps.parse_args([]).out_dir == trainer_steps.RESULTS_DIR
    chosen = trainer_steps.parse_args(["--quick", "--variants", "kd_fused", "distillens_cache_topk"])
    assert chosen.variants == ["kd_fused", "distillens_cache_topk"]
    with pytest.raises(SystemExit):
        trainer_steps.parse_args(["--variants", "no_such_variant"])


def test_sharded_steps_reports_each_launchs_median_step_without_the_first_and_the_ratio_to_zero3(
    monkeypatch, tmp_path
):
    import sharded_steps

    made = {}
    monkeypatch.setattr(
        sharded_steps.train_tiny_module(),
        "make_models",
        lambda path, hidden: made.setdefault("hidden", hidden),
    )
    per_step = {"fsdp2": [9.0, 1.0, 1.2, 1.1], "zero3": [9.0, 2.0, 2.2, 2.1]}  # the first step: warm-up
    monkeypatch.setattr(sharded_steps, "launch", lambda models, out, variant, opts: per_step[variant])
    sharded_steps.main(["--reps", "2", "--hidden-size", "48", "--out-dir", str(tmp_path), "--name", "t"])
    results = json.loads((tmp_path / "t.json").read_text())
    assert made["hidden"] == 48
    assert results["variants"]["fsdp2"]["samples"] == [1.1, 1.1]
    assert results["ratio"] == pytest.approx(1.1 / 2.1)
    assert "| fsdp2 | 1.100 s" in (tmp_path / "t.md").read_text()


def test_the_lens_speed_benchmark_runs_on_a_tiny_pair_and_writes_its_table(tmp_path):
    import lens_profile_speed

    argv = ["--tiny", "--tokens", "12", "--old-tokens", "0", "--compile", "false", "--repeats", "1"]
    assert lens_profile_speed.main([*argv, "--out-dir", str(tmp_path), "--name", "tiny"]) == 0
    results = json.loads((tmp_path / "tiny.json").read_text())
    assert results["new"]["compiled"] is False and results["new"]["seconds"] > 0
    assert results["floor"]["pairs"] == 13 * 7  # a 12-block teacher, a 6-block student: every pair
    table = (tmp_path / "tiny.md").read_text()
    assert "| **new** (reused blocks" in table and "| **floor** |" in table
