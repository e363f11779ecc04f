"""The demo's matplotlib figures; each is skipped, with a warning, when matplotlib is not installed."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..arguments import INIT_NAME

if TYPE_CHECKING:
    from ..models.training import TrainingRun

logger = logging.getLogger(__name__)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        logger.warning(
            "[demo] matplotlib is not installed (pip install 'distillens-trainer[demo]'): no figures."
        )
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_COLORS = {
    "teacher": "#444444",
    INIT_NAME: "#bbbbbb",
    "sft": "#1f77b4",
    "kd": "#ff7f0e",
    "distillens": "#2ca02c",
    "distillens_skl": "#9467bd",
    "feature": "#8c564b",
}


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [
        (entry["step"], entry[key]) for entry in history if key in entry and "train_runtime" not in entry
    ]
    return [step for step, _ in points], [value for _, value in points]


def plot_training_curves(runs: Mapping[str, TrainingRun], path: Path) -> Path | None:
    """Three panels: each student's own objective, its response-token CE, and the distillation terms."""
    plt = _pyplot()
    if plt is None:
        return None
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, run in runs.items():
        color = _COLORS.get(name)
        history = run.log_history
        axes[0].plot(*_series(history, "loss"), label=name, color=color)
        axes[1].plot(*_series(history, "ce_loss"), label=name, color=color)
        for key, style in (("kd_loss", "-"), ("lens_loss", "--"), ("feature_loss", ":")):
            steps, values = _series(history, key)
            if steps and run.objective.get(key.replace("_loss", "_weight"), 0) > 0:
                axes[2].plot(steps, values, style, label=f"{name}: {key}", color=color)
    titles = (
        "training objective (each method's own)",
        "cross-entropy on response tokens",
        "distillation terms (per token)",
    )
    for axis, title in zip(axes, titles):
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_lens_divergence(
    profiles: Mapping[str, Mapping[str, Any]], lens_layers: Sequence[int], path: Path
) -> Path | None:
    """Per-layer logit-lens divergence between each student and the teacher."""
    plt = _pyplot()
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for name, profile in profiles.items():
        layers = [s for s, _ in profile["pairs"]]
        style = "o--" if name == INIT_NAME else "o-"
        axis.plot(layers, profile["divergence"], style, label=name, color=_COLORS.get(name))
    first = next(iter(profiles.values()))
    labels = [f"s{s}\u2192t{t}" + (" *" if s in lens_layers else "") for s, t in first["pairs"]]
    axis.set_xticks([s for s, _ in first["pairs"]], labels)
    axis.set_yscale("log")
    axis.set_xlabel("student layer \u2192 teacher layer (* = matched by the lens loss; last = output)")
    axis.set_ylabel(f"{first['divergence_name'].upper()} per response token")
    axis.set_title("Logit-lens divergence from the teacher, held-out data")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_per_task(evaluations: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """Grouped bars: exact match per task family and model."""
    plt = _pyplot()
    if plt is None:
        return None
    names = list(evaluations)
    tasks = list(next(iter(evaluations.values()))["per_task"])
    width = 0.8 / len(names)
    figure, axis = plt.subplots(figsize=(max(7.0, 1.3 * len(tasks) + 2), 4.5))
    for index, name in enumerate(names):
        values = [evaluations[name]["per_task"][task]["exact_match"] for task in tasks]
        positions = [task_index + (index - (len(names) - 1) / 2) * width for task_index in range(len(tasks))]
        axis.bar(positions, values, width, label=name, color=_COLORS.get(name))
    axis.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    axis.set_ylabel("exact match (%)")
    axis.set_ylim(0, 100)
    axis.set_title("Greedy exact match per task family (test split)")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
