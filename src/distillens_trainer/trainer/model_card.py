"""Model cards for distilled students: the ``README.md`` that ``save``/``push_to_hub`` put beside the weights.

The card names the teacher and the student the run started from, the objective (weights, divergences, β,
temperature, the logit-lens layer map), the training data, shows how to load the model and cites the
DistillLens paper. Its YAML front matter carries the hub metadata, including :data:`MODEL_CARD_TAGS`.

This module takes plain values (a :class:`DistillationSummary`), not the trainer, so that it stays low in the
import graph: it imports nothing from the package but :mod:`distillens_trainer.files`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..files import write_text_atomic

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

_DIVERGENCE_TEXT = {
    "fkl": "forward KL, KL(teacher ‖ student)",
    "rkl": "reverse KL, KL(student ‖ teacher)",
    "skl": "symmetric KL (Jeffreys), forward + reverse",
    "jsd": "generalised Jensen-Shannon",
    "tvd": "total variation distance",
}

# A hub repository id: "name" or "owner/name" (letters, digits, '-', '_', '.'), at most 96 characters.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class DistillationSummary:
    """What a model card says about one training run.

    Attributes:
        student: name or path of the checkpoint the student started from.
        teacher: name or path of the frozen teacher; None for a run without one (plain SFT).
        ce_weight, kd_weight, lens_weight, feature_weight: weights of the objective's terms.
        kd_divergence, lens_divergence: divergence names (fkl, rkl, skl, jsd, tvd).
        jsd_beta: β of the generalised Jensen-Shannon divergence.
        temperature: softmax temperature of every divergence.
        layer_map: (student, teacher) ``hidden_states`` index pairs of the lens term; stored as a tuple.
        datasets: names or paths of the training data; stored as a tuple.
        lmbda: share of on-policy (student-generated) sequences, 0 = all from the dataset.
        library_version: version of distillens-trainer that trained the model.
        training_steps: optimizer steps taken, when known.
        lens_final_norm: whether the lens applied the model's final norm before its LM head, when known.
    """

    student: str
    teacher: str | None
    ce_weight: float
    kd_weight: float
    kd_divergence: str
    lens_weight: float
    lens_divergence: str
    jsd_beta: float
    temperature: float
    layer_map: Sequence[tuple[int, int]] = ()
    datasets: Sequence[str] = ()
    lmbda: float = 0.0
    library_version: str = ""
    feature_weight: float = 0.0
    training_steps: int | None = None
    lens_final_norm: bool | None = None

    def __post_init__(self) -> None:
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
        return self.kd_weight > 0 or self.lens_weight > 0 or self.feature_weight > 0


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

    ``config`` must have ``ce_weight``, ``kd_weight``, ``kd_divergence``, ``lens_weight``,
    ``lens_divergence``, ``jsd_beta`` and ``temperature``; ``feature_weight``, ``lmbda`` and
    ``lens_final_norm`` are read when present. ``teacher`` None falls back to the config's
    ``teacher_model_name_or_path`` (itself None for plain SFT).
    """
    required = (
        "ce_weight",
        "kd_weight",
        "kd_divergence",
        "lens_weight",
        "lens_divergence",
        "jsd_beta",
        "temperature",
    )
    missing = [name for name in required if not hasattr(config, name)]
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
        ce_weight=float(config.ce_weight),
        kd_weight=float(config.kd_weight),
        kd_divergence=str(config.kd_divergence),
        lens_weight=float(config.lens_weight),
        lens_divergence=str(config.lens_divergence),
        jsd_beta=float(config.jsd_beta),
        temperature=float(config.temperature),
        layer_map=tuple(layer_map or ()),
        datasets=datasets,
        lmbda=float(getattr(config, "lmbda", 0.0) or 0.0),
        library_version=version,
        feature_weight=float(getattr(config, "feature_weight", 0.0) or 0.0),
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
    text = _DIVERGENCE_TEXT.get(name)
    return f"`{name}` ({text})" if text else _code(name)


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
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


def _objective_table(summary: DistillationSummary) -> list[str]:
    terms = [
        ("Cross-entropy on response tokens", summary.ce_weight, None),
        ("Final logits (KD)", summary.kd_weight, summary.kd_divergence),
        ("Logit lens, mean over layer pairs", summary.lens_weight, summary.lens_divergence),
    ]
    if summary.feature_weight > 0:
        terms.append(("Hidden-state features (MSE)", summary.feature_weight, None))
    lines = ["| Term | Weight | Divergence |", "|---|---|---|"]
    for term, weight, divergence in terms:
        cell = _divergence(divergence) if divergence is not None and weight > 0 else "—"
        lines.append(f"| {term} | {_number(weight)} | {_cell(cell)} |")

    settings: list[tuple[str, str]] = []
    if summary.uses_teacher:
        in_use = {
            d
            for w, d in (
                (summary.kd_weight, summary.kd_divergence),
                (summary.lens_weight, summary.lens_divergence),
            )
            if w > 0
        }
        if "jsd" in in_use:
            settings.append(("JSD β", _number(summary.jsd_beta)))
        settings.append(("Temperature", _number(summary.temperature)))
        if summary.lens_weight > 0 or summary.feature_weight > 0:
            pairs = format_layer_map(summary.layer_map) or "not recorded"
            settings.append(("Layer map, (student, teacher) `hidden_states` indices", pairs))
        if summary.lens_weight > 0 and summary.lens_final_norm is not None:
            settings.append(("Final norm applied in the lens", "yes" if summary.lens_final_norm else "no"))
        settings.append(("On-policy share (λ)", _number(summary.lmbda)))
    if summary.training_steps is not None:
        settings.append(("Training steps", str(summary.training_steps)))
    if settings:
        lines += ["", "| Setting | Value |", "|---|---|"]
        lines += [f"| {name} | {_cell(value)} |" for name, value in settings]
    return lines


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
    """The ``README.md`` of a model trained with DistillLens: YAML front matter, then Markdown.

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
    tag_list = card_tags(summary, tags)
    repo = hub_model_id or model_name
    lines = [
        "---",
        _front_matter(
            summary,
            model_name=model_name,
            base_model=base_model,
            tags=tag_list,
            license=license,
            language=language,
        ).rstrip("\n"),
        "---",
        "",
        f"# {model_name}",
        "",
    ]
    paper = f"[DistillLens]({PAPER_URL})"
    if summary.uses_teacher:
        teacher = _name(summary.teacher) if summary.teacher else "a teacher whose name was not recorded"
        lines.append(
            f"This model is a student distilled from the teacher {teacher} with {paper} "
            f"(symmetric knowledge distillation through the logit lens, arXiv {PAPER_ARXIV_ID}), "
            f"starting from {_name(summary.student)}."
        )
        matched = []
        if summary.kd_weight > 0:
            matched.append("the teacher's output distribution")
        if summary.lens_weight > 0:
            matched.append("its intermediate layers read through the logit lens")
        if summary.feature_weight > 0:
            matched.append("a projection of its hidden states")
        if summary.ce_weight > 0:
            matched.append("the training responses (cross-entropy)")
        lines.append(f"The student was trained to match {_join(matched)}.")
    else:
        lines.append(
            f"This model was fine-tuned from {_name(summary.student)} on cross-entropy alone, without a "
            "teacher, with distillens-trainer (a DistillLens library)."
        )
    version = f" {summary.library_version}" if summary.library_version else ""
    lines += ["", f"Trained with distillens-trainer{version}.", ""]

    lines += ["## Training objective", ""]
    if summary.uses_teacher:
        lines += [
            "```",
            "loss = ce_weight · CE",
            "     + kd_weight · D_kd(student, teacher)",
            "     + lens_weight · mean over layer pairs (i, j) of D_lens(lens(student h[i]), lens(teacher h[j]))",
        ]
        if summary.feature_weight > 0:
            lines.append(
                "     + feature_weight · mean over layer pairs (i, j) of MSE(student h[i], W · teacher h[j])"
            )
        lines += ["```", ""]
    lines += [*_objective_table(summary), ""]

    lines += ["## Training data", ""]
    if summary.datasets:
        lines += [f"- {_name(d)}" for d in summary.datasets]
    else:
        lines.append("The training data was not recorded.")
    lines.append("")

    lines += [
        "## How to use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(repo)})",
        f"model = AutoModelForCausalLM.from_pretrained({json.dumps(repo)})",
        'inputs = tokenizer("The capital of France is", return_tensors="pt")',
        "outputs = model.generate(**inputs, max_new_tokens=32)",
        "print(tokenizer.decode(outputs[0], skip_special_tokens=True))",
        "```",
        "",
    ]

    if extra_markdown.strip():
        lines += [extra_markdown.strip(), ""]

    lines += [
        "## Citation",
        "",
        f"{PAPER_TITLE} (arXiv {PAPER_ARXIV_ID}):",
        "",
        "```bibtex",
        DISTILLENS_CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(output_dir: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``<output_dir>/README.md`` atomically (a temporary file and a rename); its path."""
    return write_text_atomic(Path(output_dir) / MODEL_CARD_NAME, text)
