"""Model cards for distilled students: the ``README.md`` that ``save``/``push_to_hub`` put beside the weights.

The card names the teacher and the student the run started from, the objective (weights, divergences, β,
temperature, the logit-lens layer map), the training data, shows how to load the model and cites the
DistillLens paper. Its YAML front matter carries the hub metadata, including :data:`MODEL_CARD_TAGS`.

This module takes plain values (a :class:`DistillationSummary`: the run's :class:`ObjectiveSpec` and a few facts
of the run), not the trainer, so that it stays low in the import graph: it imports nothing from the package but
the objective's settings (:mod:`~distillens_trainer.loss.spec`), the divergences' descriptions
(:mod:`~distillens_trainer.loss.divergences`) and :mod:`distillens_trainer.files`. The card is one template,
:data:`CARD_TEMPLATE`, filled by :func:`model_card_text`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..files import write_text_atomic
from ..loss.divergences import DIVERGENCES
from ..loss.spec import ObjectiveSpec

MODEL_CARD_NAME = "README.md"

MODEL_CARD_TAGS: tuple[str, ...] = ("distillation", "distillens")
"""Hub tags of every card this library writes ("distillation" only when a teacher was distilled)."""

PAPER_ARXIV_ID = "2602.13567"
PAPER_TITLE = "DistillLens: Symmetric Knowledge Distillation Through Logit Lens"
PAPER_URL = f"https://arxiv.org/abs/{PAPER_ARXIV_ID}"

DISTILLENS_CITATION = """\
@misc{dhakal2026distilllens,
    title         = {{DistillLens}: Symmetric Knowledge Distillation Through Logit Lens},
    author        = {Manish Dhakal and Uthman Jinadu and Anjila Budathoki and Rajshekhar Sunderraman and Yi Ding},
    year          = {2026},
    eprint        = {2602.13567},
    archivePrefix = {arXiv},
    primaryClass  = {cs.CL},
    url           = {https://arxiv.org/abs/2602.13567}
}"""
"""BibTeX entry of the paper (arXiv 2602.13567)."""

# A hub repository id: "name" or "owner/name" (letters, digits, '-', '_', '.'), at most 96 characters.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class DistillationSummary:
    """What a model card says about one training run: its objective and a few facts of the run.

    Attributes:
        student: name or path of the checkpoint the student started from.
        teacher: name or path of the frozen teacher; None for a run without one (plain SFT).
        objective: the objective's settings (weights, divergences, β, temperature), as the run used them.
        layer_map: (student, teacher) ``hidden_states`` index pairs of the lens term; stored as a tuple.
        datasets: names or paths of the training data; stored as a tuple.
        lmbda: share of on-policy (student-generated) sequences, 0 = all from the dataset.
        library_version: version of distillens-trainer that trained the model.
        training_steps: optimizer steps taken, when known.
        lens_final_norm: whether the lens applied the model's final norm before its LM head, when known.
    """

    student: str
    teacher: str | None
    objective: ObjectiveSpec
    layer_map: Sequence[tuple[int, int]] = ()
    datasets: Sequence[str] = ()
    lmbda: float = 0.0
    library_version: str = ""
    training_steps: int | None = None
    lens_final_norm: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.objective, ObjectiveSpec):
            raise TypeError(f"objective={self.objective!r} must be an ObjectiveSpec.")
        pairs = tuple((int(s), int(t)) for s, t in self.layer_map)
        object.__setattr__(self, "layer_map", pairs)
        if isinstance(self.datasets, str | os.PathLike):
            datasets: tuple[str, ...] = (os.fspath(self.datasets),)
        else:
            datasets = tuple(os.fspath(d) for d in self.datasets)
        object.__setattr__(self, "datasets", datasets)
        if self.teacher is not None:
            object.__setattr__(self, "teacher", os.fspath(self.teacher))
        object.__setattr__(self, "student", os.fspath(self.student))

    @property
    def uses_teacher(self) -> bool:
        """True when a term of the objective (KD, lens or feature) reads a teacher: the run distilled one.

        A named ``teacher`` with all three weights at 0 was never used; a run that used one whose name was
        not recorded (``teacher`` None) still distilled."""
        return self.objective.needs_teacher


def summary_from_config(
    config: Any,
    *,
    student: str | os.PathLike[str],
    teacher: str | os.PathLike[str] | None,
    layer_map: Iterable[tuple[int, int]] | None,
    datasets: Iterable[str | os.PathLike[str]] | str = (),
    version: str,
    training_steps: int | None = None,
) -> DistillationSummary:
    """A :class:`DistillationSummary` from a ``DistillLensConfig`` or any object with its attributes.

    ``config`` must have every field of :class:`ObjectiveSpec` (``DistillLensConfig`` does); ``lmbda`` and
    ``lens_final_norm`` are read when present. ``teacher`` None falls back to the config's
    ``teacher_model_name_or_path`` (itself None for plain SFT).
    """
    names = [item.name for item in dataclasses.fields(ObjectiveSpec)]
    missing = [name for name in names if not hasattr(config, name)]
    if missing:
        raise AttributeError(
            f"{type(config).__name__} has no {', '.join(missing)}: cannot describe the objective."
        )
    if teacher is None:
        teacher = getattr(config, "teacher_model_name_or_path", None)
    lens_final_norm = getattr(config, "lens_final_norm", None)
    return DistillationSummary(
        student=os.fspath(student),
        teacher=None if teacher is None else os.fspath(teacher),
        objective=ObjectiveSpec(**{name: getattr(config, name) for name in names}),
        layer_map=tuple(layer_map or ()),
        datasets=datasets,
        lmbda=float(getattr(config, "lmbda", 0.0) or 0.0),
        library_version=version,
        training_steps=training_steps,
        lens_final_norm=None if lens_final_norm is None else bool(lens_final_norm),
    )


def as_hub_id(name_or_path: str | os.PathLike[str] | None) -> str | None:
    """``name_or_path`` when it reads as a hub repository id and is not an existing local path, else None.

    Hub metadata (``base_model``, ``datasets``) must name hub repositories, not local folders.
    """
    if name_or_path is None:
        return None
    name = os.fspath(name_or_path)
    if len(name) > 96 or not _HUB_ID.match(name) or "--" in name or ".." in name or name.endswith("."):
        return None
    if Path(name).exists():
        return None
    return name


def card_tags(summary: DistillationSummary, tags: str | Iterable[str] | None = ()) -> list[str]:
    """The card's hub tags: :data:`MODEL_CARD_TAGS` then ``tags``, each once, in order of first appearance.

    "distillation" is left out for a run without a teacher (it would claim one), unless ``tags`` asks for it.
    """
    if tags is None:
        tags = ()
    elif isinstance(tags, str):
        tags = (tags,)
    ours = (
        MODEL_CARD_TAGS if summary.uses_teacher else tuple(t for t in MODEL_CARD_TAGS if t != "distillation")
    )
    result: list[str] = []
    for tag in (*ours, *tags):
        tag = str(tag).strip()
        if tag and tag not in result:
            result.append(tag)
    return result


def _name(name: str) -> str:
    """A model or dataset name in Markdown, as a code span (the front matter's ``base_model`` / ``datasets`` are
    what the hub links)."""
    return _code(name)


def _code(text: str) -> str:
    """``text`` as an inline code span (fenced with more backticks than it contains)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _join(items: Sequence[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _number(value: float) -> str:
    return f"{value:g}"


def _divergence(name: str) -> str:
    return f"`{name}` ({DIVERGENCES[name].description})"


def format_layer_map(layer_map: Iterable[tuple[int, int]]) -> str:
    """Layer pairs as ``(2, 8), (4, 16)``: (student, teacher) ``hidden_states`` indices."""
    return ", ".join(f"({s}, {t})" for s, t in layer_map)


def _front_matter(
    summary: DistillationSummary,
    *,
    model_name: str,
    base_model: str | None,
    tags: list[str],
    license: str | None,
    language: str | Sequence[str] | None,
) -> str:
    data: dict[str, Any] = {"library_name": "transformers", "model_name": model_name}
    base_model = as_hub_id(base_model)
    if base_model:
        data["base_model"] = base_model
    if license:
        data["license"] = license
    if language:
        data["language"] = [language] if isinstance(language, str) else list(language)
    datasets = [d for d in summary.datasets if as_hub_id(d) is not None]
    if datasets:
        data["datasets"] = datasets
    data["tags"] = tags
    data["pipeline_tag"] = "text-generation"
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False).rstrip("\n")


def _introduction(summary: DistillationSummary) -> str:
    """Who taught whom, and what the student was trained to match (one paragraph)."""
    spec = summary.objective
    if not summary.uses_teacher:
        return (
            f"This model was fine-tuned from {_name(summary.student)} on cross-entropy alone, without a "
            "teacher, with distillens-trainer (a DistillLens library)."
        )
    teacher = _name(summary.teacher) if summary.teacher else "a teacher whose name was not recorded"
    matched = []
    if spec.kd_weight > 0:
        matched.append("the teacher's output distribution")
    if spec.lens_weight > 0:
        matched.append("its intermediate layers read through the logit lens")
    if spec.feature_weight > 0:
        matched.append("a projection of its hidden states")
    if spec.ce_weight > 0:
        matched.append("the training responses (cross-entropy)")
    return (
        f"This model is a student distilled from the teacher {teacher} with [DistillLens]({PAPER_URL}) "
        f"(symmetric knowledge distillation through the logit lens, arXiv {PAPER_ARXIV_ID}), "
        f"starting from {_name(summary.student)}.\n"
        f"The student was trained to match {_join(matched)}."
    )


def _formula(spec: ObjectiveSpec) -> list[str]:
    """The objective as a code block (runs with a teacher only)."""
    lines = [
        "```",
        "loss = ce_weight · CE",
        "     + kd_weight · D_kd(student, teacher)",
        "     + lens_weight · mean over layer pairs (i, j) of D_lens(lens(student h[i]), lens(teacher h[j]))",
    ]
    if spec.feature_weight > 0:
        lines.append(
            "     + feature_weight · mean over layer pairs (i, j) of MSE(student h[i], W · teacher h[j])"
        )
    return [*lines, "```", ""]


def _objective_table(summary: DistillationSummary) -> list[str]:
    spec = summary.objective
    terms = [
        ("Cross-entropy on response tokens", spec.ce_weight, None),
        ("Final logits (KD)", spec.kd_weight, spec.kd_divergence),
        ("Logit lens, mean over layer pairs", spec.lens_weight, spec.lens_divergence),
    ]
    if spec.feature_weight > 0:
        terms.append(("Hidden-state features (MSE)", spec.feature_weight, None))
    lines = ["| Term | Weight | Divergence |", "|---|---|---|"]
    for term, weight, divergence in terms:
        cell = _divergence(divergence) if divergence is not None and weight > 0 else "—"
        lines.append(f"| {term} | {_number(weight)} | {_cell(cell)} |")

    settings: list[tuple[str, str]] = []
    if summary.uses_teacher:
        in_use = [
            d
            for w, d in ((spec.kd_weight, spec.kd_divergence), (spec.lens_weight, spec.lens_divergence))
            if w > 0
        ]
        if any(DIVERGENCES[d].uses_beta for d in in_use):
            settings.append(("JSD β", _number(spec.jsd_beta)))
        settings.append(("Temperature", _number(spec.temperature)))
        if spec.lens_weight > 0 or spec.feature_weight > 0:
            pairs = format_layer_map(summary.layer_map) or "not recorded"
            settings.append(("Layer map, (student, teacher) `hidden_states` indices", pairs))
        if spec.lens_weight > 0 and summary.lens_final_norm is not None:
            settings.append(("Final norm applied in the lens", "yes" if summary.lens_final_norm else "no"))
        settings.append(("On-policy share (λ)", _number(summary.lmbda)))
    if summary.training_steps is not None:
        settings.append(("Training steps", str(summary.training_steps)))
    if settings:
        lines += ["", "| Setting | Value |", "|---|---|"]
        lines += [f"| {name} | {_cell(value)} |" for name, value in settings]
    return lines


CARD_TEMPLATE = """\
---
{front_matter}
---

# {model_name}

{introduction}

Trained with distillens-trainer{version}.

## Training objective

{objective}

## Training data

{data}

## How to use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({repo})
model = AutoModelForCausalLM.from_pretrained({repo})
inputs = tokenizer("The capital of France is", return_tensors="pt")
outputs = model.generate(**inputs, max_new_tokens=32)
print(tokenizer.decode(outputs[0], skip_special_tokens=True))
```

{extra}## Citation

{paper_title} (arXiv {paper_arxiv_id}):

```bibtex
{citation}
```
"""
"""The model card, the one template: its slots are filled by :func:`model_card_text` (``str.format``)."""


def model_card_text(
    summary: DistillationSummary,
    *,
    model_name: str,
    base_model: str | None = None,
    tags: str | Iterable[str] | None = (),
    extra_markdown: str = "",
    hub_model_id: str | None = None,
    license: str | None = None,
    language: str | Sequence[str] | None = None,
) -> str:
    """The ``README.md`` of a model trained with DistillLens: :data:`CARD_TEMPLATE` filled from ``summary``.

    Args:
        summary: what the run did.
        model_name: the card's title.
        base_model: hub id of the checkpoint the student started from (hub metadata, not the teacher); left
            out when it is a local path, which the hub would reject.
        tags: hub tags added after :data:`MODEL_CARD_TAGS`; duplicates are dropped.
        extra_markdown: appended before the citation.
        hub_model_id: repository id used in the loading snippet (default: ``model_name``).
        license, language: hub metadata, left out when None.
    """
    objective = _formula(summary.objective) if summary.uses_teacher else []
    data = [f"- {_name(d)}" for d in summary.datasets] or ["The training data was not recorded."]
    return CARD_TEMPLATE.format(
        front_matter=_front_matter(
            summary,
            model_name=model_name,
            base_model=base_model,
            tags=card_tags(summary, tags),
            license=license,
            language=language,
        ),
        model_name=model_name,
        introduction=_introduction(summary),
        version=f" {summary.library_version}" if summary.library_version else "",
        objective="\n".join([*objective, *_objective_table(summary)]),
        data="\n".join(data),
        repo=json.dumps(hub_model_id or model_name),
        extra=f"{extra_markdown.strip()}\n\n" if extra_markdown.strip() else "",
        paper_title=PAPER_TITLE,
        paper_arxiv_id=PAPER_ARXIV_ID,
        citation=DISTILLENS_CITATION,
    )


def write_model_card(output_dir: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``<output_dir>/README.md`` atomically (a temporary file and a rename); its path."""
    return write_text_atomic(Path(output_dir) / MODEL_CARD_NAME, text)
