"""Figures of a lens profile (the dict of :func:`~distillens_trainer.diagnostics.report.profile_models`).

Three PNGs of fixed pixel size (``FIGURE_SIZES``): a student × teacher divergence heatmap per divergence,
per-layer curves, and entropy by relative depth. matplotlib comes with the ``demo`` extra; without it no
figure is drawn and a warning says so.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..loss.divergences import divergence_record

logger = logging.getLogger(__name__)

DPI = 100
# figure name (heatmaps: "lens_heatmap" + "_<divergence>") -> (width, height) in inches; pixels = inches × DPI.
FIGURE_SIZES: dict[str, tuple[float, float]] = {
    "lens_heatmap": (7.5, 6.0),
    "lens_layers": (16.0, 4.5),
    "lens_entropy": (7.5, 4.5),
}
STUDENT_COLOR, TEACHER_COLOR = "#1f77b4", "#444444"
_ANNOTATE_MAX_CELLS = 100  # write the value in each heatmap cell up to this many cells


def figure_pixels(name: str) -> tuple[int, int]:
    """(width, height) in pixels of figure ``name`` (``lens_heatmap_jsd`` -> the heatmap's size)."""
    key = "lens_heatmap" if name.startswith("lens_heatmap") else name
    width, height = FIGURE_SIZES[key]
    return round(width * DPI), round(height * DPI)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        logger.warning(
            "matplotlib is not installed (pip install 'distillens-trainer[demo]'): no lens figures."
        )
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, path: Path) -> Path:
    """Save through a temporary file and a rename, so a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        figure.savefig(tmp_name, dpi=DPI, format="png")
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    finally:
        plt.close(figure)
        Path(tmp_name).unlink(missing_ok=True)
    return path


def _label(name: str) -> str:
    """The divergence ``name`` in words (its registry ``label``), e.g. "JSD"."""
    return divergence_record(name).label


def _units(name: str) -> str:
    """`` (nats)`` after a label, or nothing for a divergence without a unit (its registry ``unit``)."""
    unit = divergence_record(name).unit
    return f" ({unit})" if unit else ""


def _who(report: Mapping[str, Any]) -> tuple[str, str]:
    """Names of the compared models: (student, teacher or 'student (self)')."""
    student = report["student"]["name"]
    return student, (report["teacher"]["name"] if report["teacher"] else f"{student} (self)")


def plot_heatmap(report: Mapping[str, Any], divergence: str, path: Path) -> Path | None:
    """Student layer (rows) × teacher layer (columns) divergence, mapped pairs outlined."""
    plt = _pyplot()
    if plt is None:
        return None
    matrix = report["matrix"][divergence]
    figure, axis = plt.subplots(figsize=FIGURE_SIZES["lens_heatmap"], dpi=DPI)
    image = axis.imshow(matrix, cmap="magma_r", aspect="auto", origin="lower", vmin=0.0)
    colorbar = figure.colorbar(image, ax=axis)
    colorbar.set_label(f"{_label(divergence)}{_units(divergence)} per response token")
    rows, columns = len(matrix), len(matrix[0])
    if rows * columns <= _ANNOTATE_MAX_CELLS:
        peak = max(max(row) for row in matrix) or 1.0
        for s, row in enumerate(matrix):
            for t, value in enumerate(row):
                color = "white" if value > 0.6 * peak else "black"
                axis.text(t, s, f"{value:.2g}", ha="center", va="center", fontsize=8, color=color)
    student, teacher = _who(report)
    if report["same_depth"]:
        pairs = report["same_depth"]["pairs"]
        axis.plot(
            [t for _, t in pairs], [s for s, _ in pairs], ":", color="#2ca02c", label="same relative depth"
        )
    if report["mapped"]:
        pairs = report["mapped"]["pairs"]
        axis.scatter(
            [t for _, t in pairs], [s for s, _ in pairs], s=260, marker="s", facecolors="none",
            edgecolors="#2ca02c", linewidths=2.0, label="pairs mapped by the lens loss",
        )  # fmt: skip
    has_legend = bool(axis.get_legend_handles_labels()[0])
    if has_legend:  # below the axes, so no cell is hidden
        figure.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    axis.set_xlabel(f"{'teacher' if report['teacher'] else 'student'} layer ({teacher}; 0 = embeddings)")
    axis.set_ylabel(f"student layer ({student}; 0 = embeddings)")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.yaxis.get_major_locator().set_params(integer=True)
    title = "teacher" if report["teacher"] else "its own"
    axis.set_title(
        f"Logit-lens {_label(divergence)} between student layers and {title} layers\n"
        f"(last row/column = output distribution; {report['num_tokens']} response tokens)",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0.05 if has_legend else 0, 1, 1))
    return _save(plt, figure, path)


def plot_layer_curves(report: Mapping[str, Any], path: Path) -> Path | None:
    """Three panels: divergence from the teacher per student layer, divergence from the model's own output,
    and top-1 agreement with the model's own output, against relative depth."""
    plt = _pyplot()
    if plt is None:
        return None
    divergence = report["divergences"][0]
    label = f"{_label(divergence)}{_units(divergence)}"
    figure, axes = plt.subplots(1, 3, figsize=FIGURE_SIZES["lens_layers"], dpi=DPI)
    student, teacher = report["student"], report["teacher"]

    if report["same_depth"]:
        same_depth = report["same_depth"]
        layers = [s for s, _ in same_depth["pairs"]]
        axes[0].plot(
            layers, same_depth[divergence], "o-", color=STUDENT_COLOR, label="vs same-depth teacher layer"
        )
        if report["mapped"]:
            mapped = report["mapped"]
            axes[0].plot(
                [s for s, _ in mapped["pairs"]], mapped[divergence], "*", markersize=16, color="#2ca02c",
                label="vs mapped teacher layer (lens loss)",
            )  # fmt: skip
        axes[0].set_xticks(
            layers, [f"s{s}\u2192t{t}" for s, t in same_depth["pairs"]], rotation=45, fontsize=8
        )
        axes[0].set_title("Student layer vs teacher layer at the same depth")
    else:
        layers = student["layers"][1:]
        axes[0].plot(layers, student["divergence_to_final"][divergence][1:], "o-", color=STUDENT_COLOR)
        axes[0].set_xticks(layers)
        axes[0].set_title("Student layer vs its own output (no teacher)")
    axes[0].set_xlabel("student layer (hidden_states index)")
    axes[0].set_ylabel(label)

    for entry, color in ((student, STUDENT_COLOR), (teacher, TEACHER_COLOR)):
        if entry is None:
            continue
        name = f"{entry['name']} ({entry['num_layers']} layers)"
        axes[1].plot(
            entry["relative_depth"], entry["divergence_to_final"][divergence], "o-", color=color, label=name
        )
        axes[2].plot(entry["relative_depth"], entry["top1_agreement"], "o-", color=color, label=name)
    axes[1].set_title("Each layer vs the model's own output distribution")
    axes[1].set_ylabel(label)
    axes[2].set_title("Top-1 token agrees with the model's own prediction")
    axes[2].set_ylabel("fraction of response tokens")
    axes[2].set_ylim(-0.02, 1.02)
    for axis in axes[1:]:
        axis.set_xlabel("relative depth (layer / number of layers; 0 = embeddings)")
        axis.legend(fontsize=8)
    for axis in axes:
        axis.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    figure.tight_layout()
    return _save(plt, figure, path)


def plot_entropy(report: Mapping[str, Any], path: Path) -> Path | None:
    """Entropy of each layer's lens distribution against relative depth, student and teacher."""
    plt = _pyplot()
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=FIGURE_SIZES["lens_entropy"], dpi=DPI)
    for entry, color in ((report["student"], STUDENT_COLOR), (report["teacher"], TEACHER_COLOR)):
        if entry is not None:
            name = f"{entry['name']} ({entry['num_layers']} layers)"
            axis.plot(entry["relative_depth"], entry["entropy"], "o-", color=color, label=name)
    uniform = math.log(report["vocab_size"])
    axis.axhline(uniform, ls="--", color="#999999", label="uniform over the vocabulary")
    axis.set_xlabel("relative depth (layer / number of layers; 0 = embeddings, 1 = output)")
    axis.set_ylabel("entropy (nats) per response token")
    axis.set_title("Entropy of the logit-lens distribution by depth")
    highest = max([uniform, *(max(e["entropy"]) for e in (report["student"], report["teacher"]) if e)])
    axis.set_ylim(0, 1.08 * highest)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return _save(plt, figure, path)


def write_figures(report: Mapping[str, Any], output_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Every figure of ``report`` into ``output_dir``: ``{figure name: path}`` (empty without matplotlib)."""
    output_dir = Path(output_dir)
    drawn: dict[str, Path | None] = {}
    for divergence in report["divergences"]:
        name = f"lens_heatmap_{divergence}"
        drawn[name] = plot_heatmap(report, divergence, output_dir / f"{name}.png")
    drawn["lens_layers"] = plot_layer_curves(report, output_dir / "lens_layers.png")
    drawn["lens_entropy"] = plot_entropy(report, output_dir / "lens_entropy.png")
    return {name: str(path) for name, path in drawn.items() if path is not None}
