"""``distillens demo``: the offline quickstart, run through the CLI entry point with the smoke preset."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from distillens_demo import (
    FIGURE_NAMES,
    INIT_NAME,
    PRESETS,
    RESULTS_NAME,
    DemoArguments,
    lens_divergence_profile,
    output_summary,
)
from distillens_demo.arguments import (
    BENCHMARK_EXACT_MATCH_RANGES,
    BENCHMARK_SEEDS,
    DEMO_MARKER_NAME,
    DEMO_METHODS,
    METHOD_DESCRIPTIONS,
    METHODS,
    RUN_ONLY_FIELDS,
    SMOKE_NOTE,
    TEACHER_INFO_NAME,
)
from distillens_demo.data.suite import (
    default_max_new_tokens,
    format_example,
    generate_examples,
    train_suite_tokenizer,
)
from distillens_demo.models.store import teacher_cache_path
from distillens_demo.models.training import (
    TrainingProgress,
    explicit_lens_layers,
    method_objective,
    on_policy_means,
)
from distillens_demo.models.training_data import Suite, tokenize_examples
from distillens_demo.run import _reading_notes, check_demo_output_dir
from distillens_trainer import DistillLensConfig, cli
from distillens_trainer.commands.train import RESOLVED_CONFIG_NAME
from distillens_trainer.data import DataCollatorForCompletionOnly
from distillens_trainer.loss.layer_map import resolve_layer_map
from distillens_trainer.models.info import recorded_prompt_template

from conftest import tiny_llama

REPO = Path(__file__).resolve().parents[2]

MODELS = ("teacher", "sft", "kd", "distillens")
ON_POLICY_METHODS = ("kd_onpolicy", "distillens_onpolicy")


def _demo(output_dir: Path, cache_dir: Path, *extra: str) -> int:
    return cli.main(
        ["demo", "--preset", "smoke", "--output_dir", str(output_dir), "--cache_dir", str(cache_dir), *extra]
    )


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> dict[str, dict]:
    """Two smoke demos into the same folder (as the README's second run), sharing one teacher cache: the first
    trains the teacher, the second reuses it."""
    root = tmp_path_factory.mktemp("demo")
    output_dir = root / "demo"
    runs = {}
    for name in ("first", "second"):
        code = _demo(output_dir, root / "cache")
        assert code == 0
        runs[name] = {
            "dir": output_dir,
            "results": json.loads((output_dir / RESULTS_NAME).read_text(encoding="utf-8")),
        }
    runs["cache"] = {"dir": root / "cache"}
    return runs


@pytest.mark.slow
def test_results_hold_the_four_models_with_both_scores(smoke_runs):
    results = smoke_runs["first"]["results"]
    assert list(results["models"]) == list(MODELS)
    for name in MODELS:
        entry = results["models"][name]
        for metric in ("exact_match", "rougeL"):
            value = entry[metric]
            assert isinstance(value, float | int) and math.isfinite(value), (name, metric)
            assert 0 <= value <= 100, (name, metric)
        assert entry["params"] > 0
        assert sum(task["n"] for task in entry["per_task"].values()) == PRESETS["smoke"]["num_test"]
    teacher, student = results["models"]["teacher"], results["models"]["sft"]
    assert student["num_layers"] < teacher["num_layers"] and student["hidden_size"] < teacher["hidden_size"]
    assert results["settings"]["preset"] == "smoke"


@pytest.mark.slow
def test_students_differ_only_by_objective_and_record_it(smoke_runs):
    models = smoke_runs["first"]["results"]["models"]
    assert models["sft"]["objective"]["kd_weight"] == 0 and models["sft"]["objective"]["ce_weight"] == 1
    assert models["kd"]["objective"]["lens_weight"] == 0 and models["kd"]["objective"]["kd_weight"] == 1
    assert models["distillens"]["objective"]["lens_weight"] == 1
    assert models["distillens"]["objective"]["lens_divergence"] == "jsd"
    assert models["distillens"]["layer_map"] and not models["kd"]["layer_map"]
    assert models["distillens"]["final_lens_loss"] is not None and models["kd"]["final_lens_loss"] is None
    for name in ("sft", "kd", "distillens"):
        profile = models[name]["lens_profile"]
        assert len(profile["divergence"]) == models[name]["num_layers"]
        assert all(math.isfinite(value) and value >= 0 for value in profile["divergence"])
        assert profile["divergence"][-1] == pytest.approx(profile["final"])  # last pair = the two outputs
        assert math.isfinite(models[name]["final_loss"])


@pytest.mark.slow
def test_figures_generations_and_students_are_written(smoke_runs):
    output_dir = smoke_runs["first"]["dir"]
    for name in FIGURE_NAMES:
        figure = output_dir / name
        assert figure.is_file() and figure.stat().st_size > 1000, name
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in MODELS:
        lines = (output_dir / "generations" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == PRESETS["smoke"]["num_test"]
        assert {"reference", "generation", "exact_match", "rougeL"} <= set(json.loads(lines[0]))
    assert (output_dir / "data" / "test.jsonl").is_file()
    assert (output_dir / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_second_run_reuses_the_cached_teacher(smoke_runs):
    first, second = smoke_runs["first"]["results"], smoke_runs["second"]["results"]
    assert first["teacher_cached"] is False and second["teacher_cached"] is True
    assert first["teacher_path"] == second["teacher_path"]
    assert (Path(second["teacher_path"]) / TEACHER_INFO_NAME).is_file()
    assert Path(second["teacher_path"]).parent == smoke_runs["cache"]["dir"]
    for metric in ("exact_match", "rougeL"):  # the same teacher gives the same greedy answers
        assert second["models"]["teacher"][metric] == first["models"]["teacher"][metric]
    for name in ("sft", "kd", "distillens"):  # same seeds, same teacher: the same students
        assert second["models"][name]["final_loss"] == pytest.approx(
            first["models"][name]["final_loss"], rel=1e-4
        )
    (teacher_phase,) = [name for name in first["timings_s"] if "teacher" in name]
    assert second["timings_s"][teacher_phase] < first["timings_s"][teacher_phase]


@pytest.mark.slow
def test_every_model_is_in_its_folder_with_its_tokenizer_and_prompt_format(smoke_runs):
    output_dir, results = smoke_runs["second"]["dir"], smoke_runs["second"]["results"]
    names = ("teacher", INIT_NAME, "sft", "kd", "distillens")
    assert sorted(path.name for path in (output_dir / "models").iterdir()) == sorted(names)
    assert results["model_dirs"] == {name: str(output_dir / "models" / name) for name in names}
    for name in names:
        folder = output_dir / "models" / name
        for file in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (folder / file).is_file(), (name, file)
        assert recorded_prompt_template(folder) == "plain"
    teacher = transformers.AutoModelForCausalLM.from_pretrained(output_dir / "models" / "teacher")
    cached = transformers.AutoModelForCausalLM.from_pretrained(results["teacher_path"])
    for (name, saved), (_, original) in zip(teacher.state_dict().items(), cached.state_dict().items()):
        assert torch.equal(saved, original), name


@pytest.mark.slow
def test_the_demos_models_train_on_the_demos_prompt_format_by_default(smoke_runs, tmp_path, capsys):
    models, data = smoke_runs["second"]["dir"] / "models", smoke_runs["second"]["dir"] / "data"
    code = cli.main(
        ["train", "--model_name_or_path", str(models / INIT_NAME), "--teacher_model_name_or_path",
         str(models / "teacher"), "--train_file", str(data / "train.jsonl"), "--output_dir", str(tmp_path / "mine"),
         "--lens_num_layers", "1", "--max_steps", "2", "--per_device_train_batch_size", "4",
         "--max_train_samples", "16", "--save_strategy", "no", "--report_to", "none"]
    )  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    resolved = json.loads((tmp_path / "mine" / RESOLVED_CONFIG_NAME).read_text(encoding="utf-8"))
    assert resolved["data"]["prompt_template"] == "plain"
    assert recorded_prompt_template(tmp_path / "mine") == "plain"
    assert out[-1].startswith(
        f"distillens train: model and tokenizer in {tmp_path / 'mine'} (prompt format 'plain'"
    )


@pytest.mark.slow
def test_the_demo_ends_with_where_everything_went_and_how_to_read_it(smoke_runs):
    output_dir = smoke_runs["second"]["dir"]
    args = DemoArguments(
        output_dir=str(output_dir), preset="smoke", cache_dir=str(smoke_runs["cache"]["dir"])
    )
    line = output_summary(args, smoke_runs["second"]["results"])
    assert line.startswith(
        f"distillens demo: models in {output_dir / 'models'}/{{teacher,init,sft,kd,distillens}}"
    )
    assert f"metrics in {output_dir / RESULTS_NAME}" in line and str(smoke_runs["cache"]["dir"]) in line


@pytest.fixture(scope="module")
def on_policy_run(smoke_runs) -> dict:
    """A smoke demo of the two on-policy methods, with the smoke runs' cached teacher."""
    output_dir = smoke_runs["cache"]["dir"].parent / "onpolicy"
    assert _demo(output_dir, smoke_runs["cache"]["dir"], "--methods", *ON_POLICY_METHODS) == 0
    return {
        "dir": output_dir,
        "results": json.loads((output_dir / RESULTS_NAME).read_text(encoding="utf-8")),
        "logs": json.loads((output_dir / "training_logs.json").read_text(encoding="utf-8")),
    }


@pytest.mark.slow
def test_the_on_policy_methods_train_on_sampled_completions_and_are_reported(on_policy_run):
    results, logs = on_policy_run["results"], on_policy_run["logs"]
    assert list(results["models"]) == ["teacher", *ON_POLICY_METHODS]
    assert results["teacher_cached"] is True
    train = [
        json.loads(line) for line in (on_policy_run["dir"] / "data" / "train.jsonl").read_text().splitlines()
    ]
    tokenizer = transformers.AutoTokenizer.from_pretrained(on_policy_run["dir"] / "tokenizer")
    longest = default_max_new_tokens(train, tokenizer)  # the longest training answer + 4
    for method in ON_POLICY_METHODS:
        entry = results["models"][method]
        assert 0 <= entry["exact_match"] <= 100 and math.isfinite(entry["final_loss"])
        assert entry["objective"]["lmbda"] == 1.0 and entry["objective"]["max_new_tokens"] == longest
        assert entry["objective"]["kd_weight"] == 1 and entry["description"] == METHOD_DESCRIPTIONS[method]
        training = [row for row in logs[method] if "loss" in row]
        assert training and all("completion_length" in row for row in training)
        assert all(1 <= row["completion_length"] <= longest for row in training)
        assert all(row["on_policy_fraction"] == 1.0 for row in training)
        assert on_policy_means(logs[method])["on_policy_fraction"] == 1.0
    assert results["models"]["distillens_onpolicy"]["objective"]["lens_weight"] == 1
    assert results["models"]["kd_onpolicy"]["objective"]["lens_weight"] == 0
    assert results["models"]["distillens_onpolicy"]["final_lens_loss"] is not None


def test_the_on_policy_methods_are_kd_and_distillens_with_lmbda_and_completions_sized_from_training(tmp_path):
    assert DEMO_METHODS == ("sft", "kd", "distillens")  # the demo's default stays off-policy
    assert set(METHOD_DESCRIPTIONS) == {"teacher", INIT_NAME, *METHODS}
    examples = generate_examples(40, seed=0)
    tokenizer = train_suite_tokenizer([format_example(example) for example in examples], vocab_size=300)
    suite = Suite(splits={"train": examples[:30], "test": examples[30:]}, tokenizer=tokenizer)
    args = DemoArguments(output_dir=str(tmp_path), preset="smoke")
    longest = default_max_new_tokens(examples[:30], tokenizer)
    for name, base, lmbda in [
        ("kd_onpolicy", "kd", 1.0), ("distillens_onpolicy", "distillens", 1.0),
        ("kd_mixed", "kd", 0.5), ("distillens_mixed", "distillens", 0.5),
    ]:  # fmt: skip
        objective = method_objective(name, args, suite)
        assert objective == method_objective(base, args) | {"lmbda": lmbda, "max_new_tokens": longest}
    assert "lmbda" not in method_objective("kd", args, suite)  # off-policy: no completions to size
    with pytest.raises(ValueError, match="suite"):
        method_objective("kd_onpolicy", args)
    suite.splits["train"] = []  # computed once: a later change of the split is not seen
    assert suite.completion_max_new_tokens == longest


def test_on_policy_means_weight_each_log_by_the_windows_it_covers():
    history = [
        {"loss": 1.0, "step": 1, "on_policy_fraction": 1.0, "completion_length": 10.0},
        {"loss": 1.0, "step": 5, "on_policy_fraction": 0.5, "completion_length": 20.0},  # 2 of 4 windows
        {"loss": 1.0, "step": 9, "on_policy_fraction": 0.0},  # no completion in this interval
        {"train_runtime": 1.0, "step": 9, "train_loss": 1.0},
    ]
    assert on_policy_means(history) == {"on_policy_fraction": round(3 / 9, 5), "completion_length": 16.667}
    off_policy = [{"loss": 1.0, "step": 5}, {"train_runtime": 1.0, "step": 5}]
    assert on_policy_means(off_policy) == {"on_policy_fraction": None, "completion_length": None}


def test_a_folder_holding_an_earlier_demo_is_reused_but_not_a_foreign_one(tmp_path):
    (tmp_path / DEMO_MARKER_NAME).write_text("demo", encoding="utf-8")
    (tmp_path / RESULTS_NAME).write_text("{}", encoding="utf-8")
    check_demo_output_dir(str(tmp_path), overwrite=False)
    (tmp_path / DEMO_MARKER_NAME).unlink()
    with pytest.raises(ValueError, match="not empty"):
        check_demo_output_dir(str(tmp_path), overwrite=False)


def test_the_table_is_read_with_the_benchmarks_ranges_or_the_smoke_presets_purpose(tmp_path):
    models = {name: {} for name in DEMO_METHODS}
    smoke = _reading_notes(DemoArguments(output_dir=str(tmp_path), preset="smoke"), models)
    assert smoke == [SMOKE_NOTE] and "plumbing" in SMOKE_NOTE
    default = DemoArguments(output_dir=str(tmp_path), seed=3, num_threads=1)
    assert default.is_benchmarked()
    notes = " ".join(_reading_notes(default, models))
    assert "init 16.5-47.5" in notes and "distillens 27.0-56.0" in notes and "machine" in notes
    changed = DemoArguments(output_dir=str(tmp_path), lens_weight=5.0)
    assert not changed.is_benchmarked()
    assert "One seed is one draw" in _reading_notes(changed, models)[0]


def test_the_benchmark_ranges_match_the_committed_benchmark():
    benchmark = json.loads((REPO / "benchmarks" / "results" / "quality.json").read_text(encoding="utf-8"))
    assert len(benchmark["seeds"]) == BENCHMARK_SEEDS
    scores: dict[str, list[float]] = {}
    for run in benchmark["runs"]:
        scores.setdefault(run["method"], []).append(run["exact_match"])
    expected = {name: (min(values), max(values)) for name, values in scores.items()}
    expected["teacher"] = (benchmark["teacher"]["exact_match"],) * 2
    assert expected == BENCHMARK_EXACT_MATCH_RANGES
    reference = DemoArguments(output_dir="x")
    for name, value in benchmark["settings"].items():
        if name not in RUN_ONLY_FIELDS:
            assert getattr(reference, name) == value, name


def test_a_non_empty_output_dir_is_refused_and_left_untouched(tmp_path, capsys):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("precious", encoding="utf-8")
    code = _demo(output_dir, tmp_path / "cache")
    assert code != 0
    error = capsys.readouterr().err
    assert "--overwrite_output_dir" in error and len(error.strip().splitlines()) == 1
    assert [path.name for path in output_dir.iterdir()] == ["keep.txt"]
    assert (output_dir / "keep.txt").read_text(encoding="utf-8") == "precious"
    assert not (tmp_path / "cache").exists()


def test_overwrite_output_dir_lets_a_non_empty_folder_through(tmp_path):
    (tmp_path / "keep.txt").write_text("x", encoding="utf-8")
    check_demo_output_dir(str(tmp_path), overwrite=True)
    check_demo_output_dir(str(tmp_path / "absent"), overwrite=False)
    with pytest.raises(ValueError, match="--overwrite_output_dir"):
        check_demo_output_dir(str(tmp_path), overwrite=False)


def test_the_preset_fills_only_unset_fields(tmp_path):
    args = DemoArguments(output_dir=str(tmp_path), preset="smoke", student_max_steps=7)
    assert args.student_max_steps == 7
    assert args.teacher_max_steps == PRESETS["smoke"]["teacher_max_steps"]
    assert args.tasks == PRESETS["smoke"]["tasks"]
    default = DemoArguments(output_dir=str(tmp_path))
    assert default.student_layers < default.teacher_layers
    assert default.student_hidden_size < default.teacher_hidden_size
    assert default.resolved_cache_dir == tmp_path.parent / ".distillens-cache"


def test_the_demo_arguments_shared_with_the_library_take_its_declaration():
    library = {item.name: item for item in dataclasses.fields(DistillLensConfig)}
    demo = {item.name: item for item in dataclasses.fields(DemoArguments)}
    for name in ("kd_divergence", "lens_weight", "lens_teacher_layers"):
        assert demo[name].default == library[name].default, name
        assert demo[name].metadata.get("choices") == library[name].metadata.get("choices"), name
        assert demo[name].metadata["help"].startswith(library[name].metadata["help"]), name
    # the demo's command line as before
    assert demo["kd_divergence"].metadata["choices"] == ["fkl", "rkl", "skl", "jsd", "tvd"]


@pytest.mark.parametrize(
    ("extra", "field", "code"),
    [
        (["--student_hidden_size", "48"], "student_hidden_size", cli.RUN_ERROR),
        (["--lens_num_layers", "2"], "lens_num_layers", cli.RUN_ERROR),
        (["--student_layers", "4"], "student_layers", cli.RUN_ERROR),
        (["--num_train", "0"], "num_train", cli.RUN_ERROR),
        (["--tasks", "juggling"], "tasks", cli.RUN_ERROR),
        (["--methods", "sft", "sft"], "methods", cli.RUN_ERROR),
        (["--methods", "magic"], "methods", cli.USAGE_ERROR),
        (["--lens_teacher_layers", "1", "2"], "lens_teacher_layers", cli.RUN_ERROR),
        (["--lens_teacher_layers", "9"], "lens_teacher_layers", cli.RUN_ERROR),
        (["--kd_divergence", "l2"], "kd_divergence", cli.USAGE_ERROR),
        (["--preset", "huge"], "preset", cli.USAGE_ERROR),
    ],
)
def test_bad_arguments_are_one_line_errors_naming_the_field(tmp_path, capsys, extra, field, code):
    assert _demo(tmp_path / "out", tmp_path / "cache", *extra) == code
    error = capsys.readouterr().err.strip()
    assert field in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_teacher_cache_key_follows_the_teacher_not_the_students(tmp_path):
    def path(**overrides) -> Path:
        return teacher_cache_path(
            DemoArguments(output_dir=str(tmp_path / "out"), preset="smoke", **overrides)
        )

    base = path()
    assert base.parent == tmp_path / ".distillens-cache" and base.name.startswith("teacher-")
    assert path(seed=5, student_max_steps=3, methods=["kd"]) == base
    assert path(teacher_max_steps=31) != base
    assert path(data_seed=1) != base
    assert path(num_test=25) != base  # the held-out splits are drawn first, so they change train
    assert path(cache_dir=str(tmp_path / "elsewhere")).parent == tmp_path / "elsewhere"


def test_explicit_teacher_layers_pair_with_the_evenly_spaced_student_layers():
    student = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=3))
    assert explicit_lens_layers(student, 2, None) == {}
    fields = explicit_lens_layers(student, 2, [1, 3])
    assert fields == {"lens_student_layers": [1, 2], "lens_teacher_layers": [1, 3]}
    assert resolve_layer_map(3, 4, fields["lens_student_layers"], fields["lens_teacher_layers"]) == [
        (1, 1),
        (2, 3),
    ]
    assert resolve_layer_map(3, 4, num_layers=2) == [(1, 1), (2, 2)]  # the default: floor(s * 4 / 3)


def test_without_a_terminal_training_logs_a_line_every_30_s_with_the_time_left_and_one_at_the_end(caplog):
    clock = SimpleNamespace(now=0.0)
    progress = TrainingProgress("student 'kd'", clock=lambda: clock.now)
    state = SimpleNamespace(global_step=0, max_steps=12)
    with caplog.at_level(logging.INFO, logger="distillens_demo"):
        progress.on_train_begin(None, state, None)
        for step in range(1, 13):
            clock.now += 10.0  # 10 s a step: a line after steps 3, 6 and 9, then the last one
            state.global_step = step
            progress.on_step_end(None, state, None)
            progress.on_log(None, state, None, logs={"loss": 1.0 / step})
            progress.on_log(None, state, None, logs={"train_runtime": 1.0})  # no loss: the last loss stays
        progress.on_train_end(None, state, None)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == (
        "[demo] student 'kd': 3/12 steps (25%), 0.1 steps/s, 30 s elapsed, about 1 min 30 s left, loss 0.5000"
    )
    assert [line.split(":")[1].split(",")[0] for line in lines[1:3]] == [
        " 6/12 steps (50%)",
        " 9/12 steps (75%)",
    ]
    assert lines[3] == "[demo] student 'kd': 12/12 steps done in 2 min 00 s, loss 0.0833"
    assert len(lines) == 4


def test_the_lens_profile_of_a_model_against_itself_is_zero_and_its_ce_is_the_models_own_loss():
    examples = generate_examples(12, seed=0)
    tokenizer = train_suite_tokenizer([format_example(example) for example in examples], vocab_size=300)
    dataset = tokenize_examples(examples, tokenizer, "plain")
    model = tiny_llama(num_layers=2, vocab=len(tokenizer), seed=1)

    profile = lens_divergence_profile(model, model, tokenizer, dataset, batch_size=5)

    assert profile["pairs"] == [[1, 1], [2, 2]]
    assert profile["divergence"] == pytest.approx([0.0, 0.0], abs=1e-5)
    assert profile["final"] == pytest.approx(0.0, abs=1e-5)
    batch = DataCollatorForCompletionOnly(tokenizer)([dataset[index] for index in range(len(dataset))])
    with torch.no_grad():
        own_loss = float(model(**batch).loss)  # HF's mean CE over the shifted response tokens, one batch
    assert profile["student_ce"] == pytest.approx(own_loss, abs=2e-5)
    assert profile["teacher_ce"] == profile["student_ce"]
    assert profile["num_tokens"] == int((batch["labels"][:, 1:] != -100).sum())
