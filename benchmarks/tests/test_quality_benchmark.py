"""``benchmarks/quality.py``: the statistics by hand, the report, bad arguments, and one tiny end-to-end run."""

from __future__ import annotations

import json
import math
import sys

import pytest
import quality  # benchmarks/ is on sys.path: pytest's `pythonpath` in pyproject.toml


def _run(method: str, seed: int, exact_match: float, rouge: float = 50.0) -> dict:
    return {
        "method": method,
        "seed": seed,
        "exact_match": exact_match,
        "rougeL": rouge,
        "mean_lens_jsd": 0.2,
        "output_jsd": 0.1,
        "train_time_s": 10.0,
    }


def test_paired_difference_is_the_mean_with_a_hand_computed_t_interval():
    # differences 1, 2, 3: mean 2, sample std 1, t_{0.975, 2} = 4.303, half width 4.303 / sqrt(3) = 2.484
    diff = quality.paired_difference([1.0, 2.0, 3.0])
    assert diff["mean"] == 2.0 and diff["std"] == 1.0 and diff["n"] == 3
    assert diff["t_975"] == pytest.approx(4.303, abs=1e-3)
    assert diff["ci95"] == pytest.approx([2 - 2.484, 2 + 2.484], abs=2e-3)


def test_the_t_table_is_used_without_scipy_and_rounds_df_down(monkeypatch):
    monkeypatch.setitem(
        sys.modules, "scipy.stats", None
    )  # ``from scipy.stats import t`` now raises ImportError
    assert quality.t_quantile_975(2) == 4.303
    assert quality.t_quantile_975(4) == 2.776
    assert quality.t_quantile_975(35) == 2.042  # the next smaller tabulated df (30): a wider, safe interval


def test_summary_pairs_methods_by_seed_and_skips_unpaired_seeds():
    runs = [
        _run("kd", 0, 40.0),
        _run("kd", 1, 50.0),
        _run("kd", 2, 30.0),
        _run("distillens", 0, 44.0),
        _run("distillens", 1, 53.0),  # seed 2 missing: the paired difference uses seeds 0 and 1 only
    ]
    summary = quality.summarise(runs, ["kd", "distillens"], [0, 1, 2])
    assert summary["methods"]["kd"]["exact_match"] == {"mean": 40.0, "std": 10.0, "n": 3}
    assert summary["methods"]["distillens"]["exact_match"]["n"] == 2
    paired = summary["paired"]["distillens - kd"]
    assert paired["seeds"] == [0, 1]
    assert paired["exact_match"]["per_seed"] == [4.0, 3.0]
    assert paired["exact_match"]["mean"] == 3.5
    assert "feature - kd" not in summary["paired"]  # a method that did not run has no comparison


def test_the_markdown_report_has_a_row_per_method_and_per_difference():
    runs = [_run("init", s, 10.0) for s in (0, 1)]
    runs += [_run("kd", s, 40.0 + s) for s in (0, 1)] + [_run("distillens", s, 45.0 + 3 * s) for s in (0, 1)]
    settings = {
        "tasks": ["copy_text"], "teacher_max_steps": 5, "student_layers": 2, "student_hidden_size": 32,
        "student_warmup_steps": 3, "student_max_steps": 4, "batch_size": 8, "student_learning_rate": 1e-3,
        "kd_divergence": "rkl", "lens_weight": 1.0, "num_test": 10, "num_eval": 10,
    }  # fmt: skip
    report = {
        "command": "python benchmarks/quality.py",
        "seeds": [0, 1],
        "torch_threads": 1,
        "total_time_s": 60.0,
        "settings": settings,
        "teacher": {"exact_match": 90.0, "rougeL": 95.0, "num_layers": 3, "hidden_size": 64, "params": 1e5},
        "student_params": 5e4,
        "lens_layer_map": [[1, 1]],
        "runs": runs,
        "summary": quality.summarise(runs, ["init", "kd", "distillens"], [0, 1]),
    }
    text = quality.markdown_report(report)
    assert "| distillens | 46.5 ± 2.1 |" in text
    assert "| distillens - kd | +6.00 |" in text and "+5.0, +7.0" in text
    assert "4 student runs" in text and "1 torch thread)" in text


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--seeds", "0"], "seeds"),
        (["--seeds", "1", "1"], "seeds"),
        (["--tag", "a b"], "tag"),
        (["--render", "no-such-report.json"], "render"),
        (["--student_hidden_size", "48"], "student_hidden_size"),
    ],
)
def test_bad_arguments_are_one_line_errors_naming_the_field(tmp_path, capsys, argv, field):
    assert quality.main([*argv, "--output_dir", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip()
    assert field in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_rendering_a_partial_report_is_a_one_line_error(tmp_path, capsys):
    partial = tmp_path / "quality.json"
    partial.write_text(json.dumps({"complete": False, "runs": []}), encoding="utf-8")
    assert quality.main(["--render", str(partial)]) == 1
    error = capsys.readouterr().err.strip()
    assert "partial report" in error and len(error.splitlines()) == 1
    assert not partial.with_suffix(".md").exists()


@pytest.mark.slow
def test_a_tiny_run_writes_both_reports_and_render_reproduces_the_table(tmp_path, capsys):
    argv = ["--preset", "smoke", "--seeds", "0", "1", "--methods", "kd", "distillens", "--tag", "tiny"]
    argv += ["--output_dir", str(tmp_path / "results"), "--cache_dir", str(tmp_path / "cache")]
    assert quality.main(argv) == 0
    json_path, md_path = tmp_path / "results" / "quality_tiny.json", tmp_path / "results" / "quality_tiny.md"
    report = json.loads(json_path.read_text(encoding="utf-8"))
    assert report["complete"] is True
    assert [(run["method"], run["seed"]) for run in report["runs"]] == [
        (method, seed) for seed in (0, 1) for method in ("init", "kd", "distillens")
    ]
    for run in report["runs"]:
        assert 0.0 <= run["exact_match"] <= 100.0 and math.isfinite(run["mean_lens_jsd"])
    paired = report["summary"]["paired"]["distillens - kd"]["exact_match"]
    expected = [
        next(r["exact_match"] for r in report["runs"] if r["method"] == "distillens" and r["seed"] == seed)
        - next(r["exact_match"] for r in report["runs"] if r["method"] == "kd" and r["seed"] == seed)
        for seed in (0, 1)
    ]
    assert paired["per_seed"] == pytest.approx(expected)
    table = md_path.read_text(encoding="utf-8")
    md_path.unlink()
    capsys.readouterr()
    assert quality.main(["--render", str(json_path)]) == 0
    assert md_path.read_text(encoding="utf-8") == table


def test_the_benchmark_knows_every_demo_method_and_runs_the_off_policy_ones_by_default():
    assert set(quality.ALL_METHODS) == set(quality.demo.METHODS)
    assert quality.DEFAULT_METHODS == ("sft", "kd", "distillens", "distillens_skl", "feature")
    for method, baseline in quality.COMPARISONS:
        assert method in quality.ALL_METHODS and baseline in quality.ALL_METHODS


def test_on_policy_distillens_is_paired_with_on_policy_kd_first_and_only_when_both_ran():
    on_policy = {"on_policy_fraction": 1.0, "completion_length": 12.0}
    runs = [_run(method, seed, 40.0 + seed) for method in ("kd", "distillens") for seed in (0, 1)]
    runs += [_run("kd_onpolicy", seed, 50.0 + seed) | on_policy for seed in (0, 1)]
    runs += [_run("distillens_onpolicy", seed, 52.0 + 3 * seed) | on_policy for seed in (0, 1)]
    methods = ["kd", "distillens", "kd_onpolicy", "distillens_onpolicy"]
    summary = quality.summarise(runs, methods, [0, 1])
    paired = summary["paired"]
    assert next(iter(paired)) == "distillens_onpolicy - kd_onpolicy"  # the headline
    assert paired["distillens_onpolicy - kd_onpolicy"]["exact_match"]["per_seed"] == [2.0, 4.0]
    assert paired["kd_onpolicy - kd"]["exact_match"]["per_seed"] == [10.0, 10.0]
    assert paired["distillens_onpolicy - distillens"]["exact_match"]["mean"] == 13.0
    assert not any("mixed" in name for name in paired)  # neither mixed method ran
    assert summary["methods"]["kd_onpolicy"]["completion_length"]["mean"] == 12.0
    assert summary["methods"]["kd_onpolicy"]["on_policy_fraction"]["mean"] == 1.0
    assert "completion_length" not in summary["methods"]["kd"]
    off_policy = quality.summarise(runs, ["kd", "distillens", "kd_onpolicy"], [0, 1])
    assert (
        next(iter(off_policy["paired"])) == "distillens - kd"
    )  # without on-policy distillens: the old headline
    assert "kd_onpolicy - kd" in off_policy["paired"]


def test_each_top_k_cache_is_paired_with_the_hidden_cache_and_that_with_the_teacher_model():
    methods = [
        "distillens",
        "distillens_hidden",
        "distillens_topk8",
        "distillens_topk32",
        "distillens_topk128",
    ]
    runs = [_run(method, seed, 40.0 + i + seed) for i, method in enumerate(methods) for seed in (0, 1)]
    paired = quality.summarise(runs, methods, [0, 1])["paired"]
    assert list(paired) == [
        "distillens_hidden - distillens",  # the headline of a cache run: float rounding only
        "distillens_topk8 - distillens_hidden",
        "distillens_topk32 - distillens_hidden",
        "distillens_topk128 - distillens_hidden",
    ]
    assert paired["distillens_topk128 - distillens_hidden"]["exact_match"]["per_seed"] == [3.0, 3.0]


def test_resuming_a_report_of_other_settings_is_a_one_line_error(tmp_path, capsys):
    other = {"complete": False, "settings": {}, "seeds": [0, 1], "methods": ["kd"], "runs": []}
    (tmp_path / "quality_r.json").write_text(json.dumps(other), encoding="utf-8")
    argv = ["--preset", "smoke", "--seeds", "0", "1", "--methods", "kd", "--tag", "r", "--resume"]
    assert quality.main([*argv, "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache")]) == 1
    error = capsys.readouterr().err.strip()
    assert "resume" in error and "settings" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_a_tiny_on_policy_run_reports_both_methods_and_resumes_a_stopped_run(tmp_path, capsys):
    methods = ("kd_onpolicy", "distillens_onpolicy")
    argv = ["--preset", "smoke", "--seeds", "0", "1", "--methods", *methods, "--tag", "onpolicy"]
    argv += ["--output_dir", str(tmp_path / "results"), "--cache_dir", str(tmp_path / "cache")]
    assert quality.main(argv) == 0
    json_path = tmp_path / "results" / "quality_onpolicy.json"
    report = json.loads(json_path.read_text(encoding="utf-8"))
    assert report["complete"] is True
    assert [(run["method"], run["seed"]) for run in report["runs"]] == [
        (method, seed) for seed in (0, 1) for method in ("init", *methods)
    ]
    assert report["completion_max_new_tokens"] > 4
    for run in report["runs"]:
        if run["method"] == "init":
            assert run["completion_length"] is None and run["on_policy_fraction"] is None
        else:
            assert run["on_policy_fraction"] == 1.0
            assert 1 <= run["completion_length"] <= report["completion_max_new_tokens"]
            assert run["train_time_s"] > 0
    summary = report["summary"]
    assert list(summary["paired"]) == ["distillens_onpolicy - kd_onpolicy"]
    assert summary["methods"]["distillens_onpolicy"]["completion_length"]["n"] == 2
    table = (tmp_path / "results" / "quality_onpolicy.md").read_text(encoding="utf-8")
    assert "| distillens_onpolicy - kd_onpolicy |" in table and "completion tokens |" in table

    # a run stopped before its last (method, seed): --resume trains only that one and keeps the others
    stopped = {**report, "complete": False, "runs": report["runs"][:-1]}
    stopped.pop("summary")
    json_path.write_text(json.dumps(stopped), encoding="utf-8")
    capsys.readouterr()
    assert quality.main([*argv, "--resume"]) == 0
    resumed = json.loads(json_path.read_text(encoding="utf-8"))
    assert resumed["complete"] is True and resumed["command"] == report["command"]
    assert resumed["runs"][:-1] == report["runs"][:-1]
    assert (resumed["runs"][-1]["method"], resumed["runs"][-1]["seed"]) == ("distillens_onpolicy", 1)
    assert list(resumed["summary"]["paired"]) == ["distillens_onpolicy - kd_onpolicy"]
