"""Tests for ``distillens_trainer.config.DistillLensConfig``."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
from transformers import HfArgumentParser, TrainingArguments

from distillens_trainer.config import DEPRECATED_FIELDS, DistillLensConfig
from distillens_trainer.loss.fused import resolve_chunk_size
from distillens_trainer.loss.spec import ObjectiveSpec

DISTILLENS_FIELDS = sorted(
    {f.name for f in dataclasses.fields(DistillLensConfig)}
    - {f.name for f in dataclasses.fields(TrainingArguments)}
)


def make_config(tmp_path, **kwargs) -> DistillLensConfig:
    return DistillLensConfig(output_dir=str(tmp_path), **kwargs)


def test_training_arguments_options_and_checks_still_apply(tmp_path):
    # The config stands in for TrainingArguments: inherited options keep their meaning, and the inherited
    # __post_init__ checks still run (an isinstance check would pass even if they were skipped).
    config = make_config(tmp_path, learning_rate=1e-4, gradient_accumulation_steps=2, eval_strategy="steps")
    assert config.output_dir == str(tmp_path)
    assert config.learning_rate == 1e-4 and config.gradient_accumulation_steps == 2
    assert config.eval_steps == config.logging_steps  # filled in by TrainingArguments.__post_init__
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        make_config(tmp_path, load_best_model_at_end=True, eval_strategy="steps", save_strategy="epoch")


def test_distillens_fields_include_the_objective_and_lens_settings():
    required = {
        "teacher_model_name_or_path",
        "teacher_dtype",
        "ce_weight",
        "kd_weight",
        "kd_divergence",
        "lens_weight",
        "lens_divergence",
        "jsd_beta",
        "temperature",
        "lens_student_layers",
        "lens_teacher_layers",
        "lens_num_layers",
        "lens_final_norm",
        "head_chunk_size",
        "head_compile",
    }
    missing = required - set(DISTILLENS_FIELDS)
    assert not missing, missing


def test_defaults_are_the_papers(tmp_path):
    config = make_config(tmp_path)
    assert config.ce_weight == 0.0
    assert config.kd_weight == 1.0
    assert config.kd_divergence == "rkl"
    assert config.lens_weight == 1.0
    assert config.lens_divergence == "jsd"
    assert config.jsd_beta == 0.5
    assert config.temperature == 1.0
    assert config.lens_num_layers is None  # the paper's 5 where the student allows it (default_num_pairs)
    assert DistillLensConfig(output_dir=str(tmp_path), lens_num_layers=5).lens_num_layers == 5  # explicit
    assert config.lens_student_layers is None
    assert config.lens_teacher_layers is None
    assert config.lens_final_norm is True
    assert (
        config.head_chunk_size == "auto" and config.head_compile is False
    )  # fused, chunked, eager by default
    assert config.head_chunk_tokens == "auto"
    assert config.teacher_dtype == "auto"
    assert config.teacher_model_name_or_path is None


def test_objective_mirrors_the_defaults(tmp_path):
    objective = make_config(tmp_path).objective_spec
    assert isinstance(objective, ObjectiveSpec)
    assert objective == ObjectiveSpec(
        ce_weight=0.0,
        kd_weight=1.0,
        kd_divergence="rkl",
        lens_weight=1.0,
        lens_divergence="jsd",
        jsd_beta=0.5,
        temperature=1.0,
    )
    assert objective == ObjectiveSpec()


def test_objective_copies_every_spec_field_from_the_config(tmp_path):
    config = make_config(tmp_path, ce_weight=0.3, kd_divergence="tvd", jsd_beta=0.7, temperature=1.5)
    objective = config.objective_spec
    for spec_field in dataclasses.fields(ObjectiveSpec):
        assert getattr(objective, spec_field.name) == getattr(config, spec_field.name), spec_field.name


def test_objective_mirrors_custom_values(tmp_path):
    config = make_config(
        tmp_path,
        ce_weight=0.5,
        kd_weight=2.0,
        kd_divergence="fkl",
        lens_weight=0.0,
        lens_divergence="tvd",
        jsd_beta=0.2,
        temperature=2.0,
    )
    assert config.objective_spec == ObjectiveSpec(
        ce_weight=0.5,
        kd_weight=2.0,
        kd_divergence="fkl",
        lens_weight=0.0,
        lens_divergence="tvd",
        jsd_beta=0.2,
        temperature=2.0,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.objective_spec.kd_weight = 3.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(jsd_beta=0.0),
        dict(jsd_beta=1.0),
        dict(ce_weight=1.0, kd_weight=0.0, lens_weight=0.0),  # plain SFT
        dict(lens_weight=0.0, lens_num_layers=0),  # no lens: K is irrelevant
        dict(lens_student_layers=[2, 4], lens_num_layers=0),  # explicit layers: K is irrelevant
        dict(lens_student_layers=[2, 4], lens_teacher_layers=[8, 16]),
        dict(teacher_dtype="bfloat16"),
        dict(teacher_dtype="float32"),
        dict(temperature=0.01),  # MIN_TEMPERATURE
    ],
    ids=lambda kwargs: ",".join(f"{k}={v}" for k, v in kwargs.items()),
)
def test_valid_edge_values_are_accepted(tmp_path, kwargs):
    config = make_config(tmp_path, **kwargs)
    for key, value in kwargs.items():
        assert getattr(config, key) == value


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(kd_divergence="kl"), "kd_divergence"),
        (dict(lens_divergence="js"), "lens_divergence"),
        (dict(ce_weight=-0.1), "ce_weight"),
        (dict(kd_weight=-1.0), "kd_weight"),
        (dict(lens_weight=-1e-6), "lens_weight"),
        (dict(ce_weight=0.0, kd_weight=0.0, lens_weight=0.0), "kd_weight"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(jsd_beta=-0.1), "jsd_beta"),
        (dict(jsd_beta=1.1), "jsd_beta"),
        (dict(lens_student_layers=[2, 4], lens_teacher_layers=[8]), "lens_teacher_layers"),
        (dict(lens_teacher_layers=[8, 16]), "lens_student_layers"),
        (dict(lens_student_layers=[0, 4]), "lens_student_layers"),
        (dict(lens_student_layers=[2, 4], lens_teacher_layers=[8, 0]), "lens_teacher_layers"),
        (dict(teacher_dtype="int8"), "teacher_dtype"),
        (dict(teacher_dtype="fp16"), "teacher_dtype"),
        (dict(lens_num_layers=0), "lens_num_layers"),
    ],
    ids=[
        "unknown-kd-divergence",
        "unknown-lens-divergence",
        "negative-ce-weight",
        "negative-kd-weight",
        "negative-lens-weight",
        "all-weights-zero",
        "temperature-zero",
        "temperature-negative",
        "jsd-beta-below-0",
        "jsd-beta-above-1",
        "layer-list-lengths-differ",
        "teacher-layers-without-student-layers",
        "student-index-0",
        "teacher-index-0",
        "bad-teacher-dtype",
        "teacher-dtype-alias",
        "lens-num-layers-zero-with-lens",
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_config(tmp_path, **kwargs)


def test_all_weights_zero_names_every_weight(tmp_path):
    with pytest.raises(ValueError) as info:
        make_config(tmp_path, ce_weight=0.0, kd_weight=0.0, lens_weight=0.0)
    for name in ("ce_weight", "kd_weight", "lens_weight"):
        assert name in str(info.value)


def test_unknown_divergence_message_lists_the_valid_names(tmp_path):
    with pytest.raises(ValueError, match="kd_divergence") as info:
        make_config(tmp_path, kd_divergence="kl")
    for name in ("fkl", "rkl", "skl", "jsd", "tvd"):
        assert name in str(info.value)


# --------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------


def test_hf_argument_parser_parses_distillens_flags(tmp_path):
    parser = HfArgumentParser(DistillLensConfig)
    (config,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--kd_divergence",
            "skl",
            "--lens_student_layers",
            "2",
            "4",
            "--lens_teacher_layers",
            "8",
            "16",
            "--lens_final_norm",
            "false",
        ]
    )
    assert isinstance(config, DistillLensConfig)
    assert config.output_dir == str(tmp_path)
    assert config.kd_divergence == "skl"
    assert config.lens_student_layers == [2, 4]
    assert config.lens_teacher_layers == [8, 16]
    assert all(type(i) is int for i in config.lens_student_layers + config.lens_teacher_layers)
    assert config.lens_final_norm is False
    # Untouched fields keep the paper's defaults.
    assert config.lens_divergence == "jsd"
    assert config.objective_spec.kd_divergence == "skl"


def test_hf_argument_parser_parses_numbers_and_dtype(tmp_path):
    parser = HfArgumentParser(DistillLensConfig)
    (config,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--ce_weight",
            "0.25",
            "--jsd_beta",
            "0.1",
            "--temperature",
            "2",
            "--lens_num_layers",
            "3",
            "--teacher_dtype",
            "bfloat16",
            "--teacher_model_name_or_path",
            "some/teacher",
        ]
    )
    assert config.ce_weight == 0.25
    assert config.jsd_beta == 0.1
    assert config.temperature == 2.0
    assert config.lens_num_layers == 3
    assert config.teacher_dtype == "bfloat16"
    assert config.teacher_model_name_or_path == "some/teacher"


@pytest.mark.parametrize(("given", "parsed"), [("auto", "auto"), ("256", 256), ("0", 0)])
def test_the_chunk_size_is_auto_or_a_number_of_tokens_on_the_command_line(tmp_path, given, parsed):
    parser = HfArgumentParser(DistillLensConfig)
    (config,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--head_chunk_size", given]
    )
    assert config.head_chunk_size == given  # the field keeps the string it is annotated as
    assert config.head_chunk_tokens == parsed  # the checked value: an int, or "auto"
    assert make_config(tmp_path, head_chunk_size=parsed).head_chunk_size == given  # a Python int too
    with pytest.raises(ValueError, match="head_chunk_size='big' must be 'auto' or an integer >= 0"):
        DistillLensConfig(output_dir=str(tmp_path), head_chunk_size="big")


@pytest.mark.parametrize(
    ("old", "new", "value", "read"),
    [("lens_chunk_size", "head_chunk_size", 5, "5"), ("lens_compile", "head_compile", True, True)],
)
def test_the_deprecated_lens_names_still_work_and_warn(tmp_path, old, new, value, read):
    with pytest.warns(FutureWarning, match=f"DistillLensConfig.{old} is deprecated .*: use {new}"):
        config = make_config(tmp_path, **{old: value})
    assert getattr(config, new) == read
    with pytest.warns(FutureWarning, match=old):  # the same value under both names is no conflict
        assert getattr(make_config(tmp_path, **{old: value, new: value}), new) == read
    with pytest.warns(FutureWarning, match=old):  # the command line takes the old flag too
        (parsed,) = HfArgumentParser(DistillLensConfig).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), f"--{old}", str(value).lower()]
        )
    assert getattr(parsed, new) == read
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        make_config(tmp_path, **{new: value})  # the new name alone says nothing


def test_the_deprecated_and_the_new_name_with_different_values_are_refused_in_one_line(tmp_path):
    for old, new, value, other in [
        ("lens_chunk_size", "head_chunk_size", 5, 16),
        ("lens_compile", "head_compile", False, True),
    ]:
        with pytest.warns(FutureWarning), pytest.raises(ValueError) as error:
            make_config(tmp_path, **{old: value, new: other})
        message = str(error.value)
        assert len(message.splitlines()) == 1
        assert f"{old}={value!r} and {new}={other!r} disagree" in message and f"give only {new}" in message


def test_the_head_fields_say_they_govern_every_terms_fused_head():
    fields = {f.name: f for f in dataclasses.fields(DistillLensConfig)}
    assert "for every term that reads logits" in fields["head_chunk_size"].metadata["help"]
    assert "every term's fused LM head" in fields["head_compile"].metadata["help"]
    for old, new in DEPRECATED_FIELDS.items():
        assert fields[old].default is None
        assert fields[old].metadata["help"].startswith(f"Deprecated: use --{new}")


def test_from_training_arguments_does_not_repeat_a_deprecated_name(tmp_path):
    with pytest.warns(FutureWarning):
        config = make_config(tmp_path, lens_chunk_size=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert DistillLensConfig.from_training_arguments(config).head_chunk_size == "5"


@pytest.mark.parametrize(
    ("vocab_size", "tokens"),
    [  # 256 MiB / (4 blocks · 4 bytes · V), down to a multiple of 64, within [64, 4096]
        (49_152, 320),  # SmolLM2: 341.3 -> 320
        (128_256, 128),  # Llama 3: 130.8 -> 128
        (32_000, 512),  # Llama 2: 524.3 -> 512
        (1_000, 4096),  # 16,777 -> the upper limit
        (4_000_000, 64),  # 4.2 -> the lower limit
    ],
)
def test_the_automatic_chunk_size_keeps_four_blocks_within_256_mib(vocab_size, tokens):
    assert resolve_chunk_size("auto", vocab_size) == tokens
    assert resolve_chunk_size(100, vocab_size) == 100


def test_hf_argument_parser_rejects_unknown_divergence_choice(tmp_path, capsys):
    parser = HfArgumentParser(DistillLensConfig)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--kd_divergence", "kl"])
    assert "kd_divergence" in capsys.readouterr().err


def test_hf_argument_parser_surfaces_post_init_validation(tmp_path):
    parser = HfArgumentParser(DistillLensConfig)
    with pytest.raises(ValueError, match="jsd_beta"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--jsd_beta", "1.5"])


def test_help_text_mentions_every_distillens_field():
    help_text = HfArgumentParser(DistillLensConfig).format_help()
    missing = [name for name in DISTILLENS_FIELDS if f"--{name}" not in help_text]
    assert not missing, missing


def test_every_distillens_field_has_help_metadata():
    fields = {f.name: f for f in dataclasses.fields(DistillLensConfig)}
    undocumented = [name for name in DISTILLENS_FIELDS if not fields[name].metadata.get("help")]
    assert not undocumented, undocumented


def test_config_serialises_to_json(tmp_path):
    config = make_config(tmp_path, lens_student_layers=[2, 4], lens_teacher_layers=[8, 16])
    data = json.loads(config.to_json_string())
    assert data["lens_student_layers"] == [2, 4]
    assert data["lens_teacher_layers"] == [8, 16]
    assert data["kd_divergence"] == "rkl"
    assert data["lens_final_norm"] is True


@pytest.mark.parametrize("field", ["ce_weight", "kd_weight", "lens_weight", "temperature"])
def test_nan_weight_or_temperature_raises_value_error(tmp_path, field):
    with pytest.raises(ValueError, match=field):
        make_config(tmp_path, **{field: float("nan")})


def test_nan_jsd_beta_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="jsd_beta"):
        make_config(tmp_path, jsd_beta=float("nan"))


def test_the_ce_weight_help_and_the_readme_explain_eval_loss():
    (ce_field,) = [f for f in dataclasses.fields(DistillLensConfig) if f.name == "ce_weight"]
    assert "eval_ce_loss" in ce_field.metadata["help"] and "perplexity" in ce_field.metadata["help"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## What it computes", 1)[1].split("\n## ", 1)[0]
    assert "eval_ce_loss" in section and "perplexity" in section


def test_a_deprecated_name_hands_its_value_over_and_keeps_no_copy(tmp_path):
    with pytest.warns(FutureWarning):
        config = make_config(tmp_path, lens_chunk_size=5, lens_compile=True)
    assert (config.head_chunk_size, config.head_compile) == ("5", True)
    assert (config.lens_chunk_size, config.lens_compile) == (None, None)
    assert config.to_dict()["lens_chunk_size"] is None
