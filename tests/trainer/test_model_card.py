"""Tests for ``distillens_trainer.trainer.model_card``: the README.md written beside a distilled student."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import yaml

from distillens_trainer.loss.divergences import DIVERGENCES
from distillens_trainer.loss.spec import ObjectiveSpec
from distillens_trainer.trainer.model_card import (
    DISTILLENS_CITATION,
    MODEL_CARD_TAGS,
    DistillationSummary,
    as_hub_id,
    card_tags,
    format_layer_map,
    model_card_text,
    summary_from_config,
    write_model_card,
)


def paper_config(**overrides) -> SimpleNamespace:
    """The attributes of a DistillLensConfig that a card reads, at the paper's defaults."""
    values = dict(
        ce_weight=0.0,
        kd_weight=1.0,
        kd_divergence="rkl",
        lens_weight=1.0,
        lens_divergence="jsd",
        jsd_beta=0.5,
        temperature=1.0,
        feature_weight=0.0,
        label_smoothing_factor=0.0,
        teacher_model_name_or_path="gpt2-xl",
    )
    values.update(overrides)
    return SimpleNamespace(**values)


SPEC_FIELDS = {item.name for item in dataclasses.fields(ObjectiveSpec)}


def gpt2_summary(**overrides) -> DistillationSummary:
    values = dict(
        student="gpt2",
        teacher="gpt2-xl",
        ce_weight=0.25,
        kd_weight=1.0,
        kd_divergence="rkl",
        lens_weight=0.5,
        lens_divergence="jsd",
        jsd_beta=0.3,
        temperature=2.0,
        layer_map=[(2, 8), (4, 16), (6, 24), (8, 32), (10, 40)],
        datasets=["databricks/databricks-dolly-15k"],
        library_version="0.1.0",
    )
    values.update(overrides)
    objective = ObjectiveSpec(**{name: value for name, value in values.items() if name in SPEC_FIELDS})
    run = {name: value for name, value in values.items() if name not in SPEC_FIELDS}
    return DistillationSummary(objective=objective, **run)


def sft_summary() -> DistillationSummary:
    return gpt2_summary(teacher=None, ce_weight=1.0, kd_weight=0.0, lens_weight=0.0, layer_map=[])


def split_card(text: str) -> tuple[dict, str]:
    """The parsed YAML front matter and the Markdown body of a card."""
    assert text.startswith("---\n")
    front, body = text[len("---\n") :].split("\n---\n", 1)
    return yaml.safe_load(front), body


def table_row(body: str, first_cell: str) -> list[str]:
    """The cells of the Markdown table row whose first cell is ``first_cell``."""
    for line in body.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in:\n{body}")


# --------------------------------------------------------------------------------------------------
# What the card says.
# --------------------------------------------------------------------------------------------------


def test_card_names_the_teacher_and_the_student():
    _, body = split_card(model_card_text(gpt2_summary(), model_name="gpt2-distilled"))

    assert body.splitlines()[1] == "# gpt2-distilled"
    assert "distilled from the teacher `gpt2-xl`" in body
    assert "starting from `gpt2`" in body


def test_local_paths_are_named_as_code_not_as_hub_links(tmp_path):
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    summary = gpt2_summary(student="./runs/student", teacher=str(teacher_dir))
    front, body = split_card(model_card_text(summary, model_name="s", base_model="./runs/student"))

    assert f"the teacher `{teacher_dir}`" in body
    assert "starting from `./runs/student`" in body
    assert "base_model" not in front  # the hub only accepts repository ids there


def test_card_lists_the_weights_and_divergences_as_given():
    _, body = split_card(model_card_text(gpt2_summary(), model_name="m"))

    assert table_row(body, "Cross-entropy on response tokens") == [
        "Cross-entropy on response tokens",
        "0.25",
        "—",
    ]
    assert table_row(body, "Final logits (KD)") == [
        "Final logits (KD)",
        "1",
        "`rkl` (reverse KL, KL(student ‖ teacher))",
    ]
    assert table_row(body, "Logit lens, mean over layer pairs") == [
        "Logit lens, mean over layer pairs",
        "0.5",
        f"`jsd` ({DIVERGENCES['jsd'].description})",
    ]
    assert table_row(body, "JSD β")[1] == "0.3"
    assert table_row(body, "Temperature")[1] == "2"
    assert table_row(body, "On-policy share (λ)")[1] == "0"


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_card_describes_each_divergence_as_the_registry_does(name):
    _, body = split_card(model_card_text(gpt2_summary(kd_divergence=name), model_name="m"))

    description = DIVERGENCES[name].description.replace("|", "\\|")  # escaped in a Markdown table cell
    assert f"| Final logits (KD) | 1 | `{name}` ({description}) |" in body


def test_beta_is_shown_only_when_a_divergence_in_use_reads_it():
    _, body = split_card(model_card_text(gpt2_summary(lens_weight=0.0), model_name="m"))  # rkl alone

    assert "JSD β" not in body


def test_the_summary_takes_the_objective_spec_and_does_not_repeat_its_fields():
    summary_fields = {item.name for item in dataclasses.fields(DistillationSummary)}

    assert not summary_fields & SPEC_FIELDS
    assert "objective" in summary_fields


def test_card_writes_the_layer_map_as_student_teacher_pairs():
    _, body = split_card(model_card_text(gpt2_summary(), model_name="m"))

    row = table_row(body, "Layer map, (student, teacher) `hidden_states` indices")
    assert row[1] == "(2, 8), (4, 16), (6, 24), (8, 32), (10, 40)"
    assert format_layer_map([(4, 5), (7, 10)]) == "(4, 5), (7, 10)"


def test_card_lists_the_training_data():
    summary = gpt2_summary(datasets=["databricks/databricks-dolly-15k", "/data/train.jsonl"])
    front, body = split_card(model_card_text(summary, model_name="m"))

    assert "- `databricks/databricks-dolly-15k`" in body
    assert "- `/data/train.jsonl`" in body
    assert front["datasets"] == ["databricks/databricks-dolly-15k"]  # a local file is no hub dataset


def test_card_says_when_the_data_was_not_recorded():
    front, body = split_card(model_card_text(gpt2_summary(datasets=[]), model_name="m"))

    assert "The training data was not recorded." in body
    assert "datasets" not in front


def test_card_shows_how_to_load_the_model_from_its_repository():
    text = model_card_text(gpt2_summary(), model_name="gpt2-distilled", hub_model_id="me/gpt2-distilled")

    assert 'AutoModelForCausalLM.from_pretrained("me/gpt2-distilled")' in text
    assert 'AutoTokenizer.from_pretrained("me/gpt2-distilled")' in text


def test_loading_snippet_falls_back_to_the_model_name():
    text = model_card_text(gpt2_summary(), model_name="gpt2-distilled")

    assert 'AutoModelForCausalLM.from_pretrained("gpt2-distilled")' in text


def test_extra_markdown_is_included():
    text = model_card_text(gpt2_summary(), model_name="m", extra_markdown="## Evaluation\n\nROUGE-L 25.2")

    assert "## Evaluation\n\nROUGE-L 25.2" in text
    assert text.index("## Evaluation") < text.index("## Citation")


# --------------------------------------------------------------------------------------------------
# Front matter and tags.
# --------------------------------------------------------------------------------------------------


def test_front_matter_parses_as_yaml_with_the_hub_metadata():
    text = model_card_text(
        gpt2_summary(), model_name="gpt2-distilled", base_model="gpt2", license="apache-2.0", language="en"
    )
    front, _ = split_card(text)

    assert front["library_name"] == "transformers"
    assert front["model_name"] == "gpt2-distilled"
    assert front["base_model"] == "gpt2"
    assert front["license"] == "apache-2.0"
    assert front["language"] == ["en"]
    assert front["pipeline_tag"] == "text-generation"
    assert front["tags"] == ["distillation", "distillens"]


def test_front_matter_leaves_out_what_was_not_given():
    front, _ = split_card(model_card_text(gpt2_summary(), model_name="m"))

    assert "base_model" not in front
    assert "license" not in front
    assert "language" not in front


def test_tags_contain_ours_once_even_when_passed_again():
    text = model_card_text(
        gpt2_summary(), model_name="m", tags=["distillens", "custom", "distillation", "custom", "trl"]
    )
    front, _ = split_card(text)

    assert front["tags"].count("distillation") == 1
    assert front["tags"].count("distillens") == 1
    assert front["tags"] == ["distillation", "distillens", "custom", "trl"]


def test_a_single_tag_string_is_one_tag():
    # Trainer.push_to_hub passes ``tags`` through as given, a string included.
    assert card_tags(gpt2_summary(), "my-tag") == ["distillation", "distillens", "my-tag"]
    assert card_tags(gpt2_summary(), None) == list(MODEL_CARD_TAGS)


def test_names_with_yaml_and_markdown_specials_stay_intact():
    summary = gpt2_summary(student="a: b | c", teacher="t`eacher")
    text = model_card_text(summary, model_name="name: with # colon", tags=["x: y"])
    front, body = split_card(text)

    assert front["model_name"] == "name: with # colon"
    assert "x: y" in front["tags"]
    assert "``t`eacher``" in body


# --------------------------------------------------------------------------------------------------
# Citation.
# --------------------------------------------------------------------------------------------------


def test_citation_names_the_arxiv_paper():
    text = model_card_text(gpt2_summary(), model_name="m")

    assert "## Citation" in text
    assert DISTILLENS_CITATION in text
    assert "eprint        = {2602.13567}" in DISTILLENS_CITATION
    assert "archivePrefix = {arXiv}" in DISTILLENS_CITATION
    assert DISTILLENS_CITATION.startswith("@misc{")
    assert DISTILLENS_CITATION.count("{") == DISTILLENS_CITATION.count("}")
    assert "https://arxiv.org/abs/2602.13567" in text


# --------------------------------------------------------------------------------------------------
# A run without a teacher.
# --------------------------------------------------------------------------------------------------


def test_sft_only_card_does_not_claim_a_teacher():
    front, body = split_card(model_card_text(sft_summary(), model_name="sft-baseline"))

    assert "distillation" not in front["tags"]
    assert "distillens" in front["tags"]
    assert "distilled from" not in body
    assert "without a teacher" in body
    assert "Layer map" not in body
    assert "KL(" not in body  # no divergence is in use
    assert table_row(body, "Final logits (KD)") == ["Final logits (KD)", "0", "—"]
    assert table_row(body, "Cross-entropy on response tokens")[1] == "1"


def test_a_named_teacher_that_no_term_reads_is_not_claimed():
    summary = sft_summary()
    summary = dataclasses.replace(summary, teacher="gpt2-xl")
    front, body = split_card(model_card_text(summary, model_name="m"))

    assert not summary.uses_teacher
    assert "gpt2-xl" not in body
    assert "distillation" not in front["tags"]


def test_a_teacher_without_a_recorded_name_is_still_a_distillation():
    summary = gpt2_summary(teacher=None)
    front, body = split_card(model_card_text(summary, model_name="m"))

    assert summary.uses_teacher
    assert "a teacher whose name was not recorded" in body
    assert "distillation" in front["tags"]


# --------------------------------------------------------------------------------------------------
# Building the summary from a config.
# --------------------------------------------------------------------------------------------------


def test_summary_from_config_reads_the_objective():
    summary = summary_from_config(
        paper_config(),
        student="gpt2",
        teacher="gpt2-large",
        layer_map=[(2, 8), (4, 16)],
        datasets=["databricks/databricks-dolly-15k"],
        version="0.1.0",
        training_steps=120,
    )

    assert summary == DistillationSummary(
        student="gpt2",
        teacher="gpt2-large",
        objective=ObjectiveSpec(
            ce_weight=0.0,
            kd_weight=1.0,
            kd_divergence="rkl",
            lens_weight=1.0,
            lens_divergence="jsd",
            jsd_beta=0.5,
            temperature=1.0,
        ),
        layer_map=((2, 8), (4, 16)),
        datasets=("databricks/databricks-dolly-15k",),
        lmbda=0.0,
        library_version="0.1.0",
        training_steps=120,
    )


def test_summary_from_config_falls_back_to_the_configured_teacher():
    summary = summary_from_config(
        paper_config(), student="gpt2", teacher=None, layer_map=None, version="0.1.0"
    )

    assert summary.teacher == "gpt2-xl"
    assert summary.layer_map == ()
    assert summary.datasets == ()


def test_summary_from_config_reads_optional_fields_when_present():
    config = paper_config(lmbda=0.5, feature_weight=0.1, lens_final_norm=False)
    summary = summary_from_config(config, student="s", teacher="t", layer_map=[(1, 2)], version="0.1.0")
    _, body = split_card(model_card_text(summary, model_name="m"))

    assert (summary.lmbda, summary.objective.feature_weight, summary.lens_final_norm) == (0.5, 0.1, False)
    assert table_row(body, "On-policy share (λ)")[1] == "0.5"
    assert table_row(body, "Hidden-state features (MSE)")[1] == "0.1"
    assert table_row(body, "Final norm applied in the lens")[1] == "no"


def test_summary_from_config_names_missing_attributes():
    config = paper_config()
    del config.jsd_beta, config.temperature

    with pytest.raises(AttributeError, match="jsd_beta, temperature"):
        summary_from_config(config, student="s", teacher=None, layer_map=None, version="0.1.0")


def test_summary_is_frozen_and_stores_sequences_as_tuples():
    summary = gpt2_summary(layer_map=[[2, 8]], datasets="one/dataset")

    assert summary.layer_map == ((2, 8),)
    assert summary.datasets == ("one/dataset",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.training_steps = 1  # type: ignore[misc]


def test_hub_ids_are_told_apart_from_local_paths(tmp_path, monkeypatch):
    assert as_hub_id("gpt2") == "gpt2"
    assert as_hub_id("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert as_hub_id(None) is None
    assert as_hub_id("/abs/path") is None
    assert as_hub_id("./rel") is None
    assert as_hub_id("a/b/c") is None
    assert as_hub_id(str(tmp_path)) is None
    (tmp_path / "student").mkdir()
    monkeypatch.chdir(tmp_path)
    assert as_hub_id("student") is None  # a local folder with a hub-like name
    assert as_hub_id("runs/student") == "runs/student"  # no such folder here: read as owner/name


# --------------------------------------------------------------------------------------------------
# Writing the card.
# --------------------------------------------------------------------------------------------------


def test_write_model_card_writes_readme(tmp_path):
    text = model_card_text(gpt2_summary(), model_name="m")

    path = write_model_card(tmp_path / "out", text)

    assert path == tmp_path / "out" / "README.md"
    assert path.read_text(encoding="utf-8") == text


def test_replacing_a_card_leaves_no_temp_files(tmp_path):
    (tmp_path / "README.md").write_text("old card\n", encoding="utf-8")
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    text = model_card_text(gpt2_summary(), model_name="m")

    write_model_card(tmp_path, text)

    assert (tmp_path / "README.md").read_text(encoding="utf-8") == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json"]


def test_a_distilled_students_card_names_its_teacher_objective_and_layer_map(tmp_path):
    import copy

    from distillens_trainer import DistillLensConfig, DistillLensTrainer

    from conftest import tiny_llama

    teacher_dir = tmp_path / "teacher"
    tiny_llama(num_layers=4, seed=2).save_pretrained(teacher_dir)
    args = DistillLensConfig(
        output_dir=str(tmp_path / "student-out"), use_cpu=True, report_to=[], lens_num_layers=2,
        teacher_model_name_or_path=str(teacher_dir), kd_divergence="skl",
    )  # fmt: skip
    trainer = DistillLensTrainer(model=copy.deepcopy(tiny_llama(num_layers=3, seed=1)), args=args)
    trainer.create_model_card(dataset="dolly/train.jsonl", tags=["my-tag"])
    card = (tmp_path / "student-out" / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---")[1])
    assert {"distillation", "distillens", "my-tag"} <= set(front["tags"])
    assert str(teacher_dir) in card and "dolly/train.jsonl" in card and "2602.13567" in card
    assert "skl" in card or "Jeffreys" in card
    for student_layer, teacher_layer in trainer.layer_map:
        assert f"({student_layer}, {teacher_layer})" in card
