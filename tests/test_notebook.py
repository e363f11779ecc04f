"""The quickstart notebook and the swap-your-Trainer script run end to end (offline, CPU, tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
NOTEBOOK = REPO / "examples" / "notebooks" / "quickstart.ipynb"
SCRIPT = REPO / "examples" / "swap_your_trainer.py"

CELL_TIMEOUT_S = 300
SCRIPT_TIMEOUT_S = 300
LOG_MARKER = "DISTILLENS_LOG_HISTORY="


def _env_with_src(base: dict[str, str]) -> dict[str, str]:
    """`base` with <repo>/src first on PYTHONPATH (the package may not be installed) and one BLAS thread.

    One thread keeps these tiny models fast when other tests share the cores; a value already set wins.
    """
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), base.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_stored_notebook_has_no_outputs():
    """The committed notebook stays clean: no outputs, no execution counts, the python3 kernel."""
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell["outputs"] == [], f"stored outputs in cell {cell.get('id')}: clear them before committing"
        assert cell["execution_count"] is None, f"stored execution_count in cell {cell.get('id')}"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    # The kernel is a child process: it inherits os.environ at start-up.
    for key, value in _env_with_src(dict(os.environ)).items():
        monkeypatch.setenv(key, value)

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # A test-only last cell (never written back) exposes the student's logs to the test.
    notebook.cells.append(
        nbformat.v4.new_code_cell(
            f"import json\nprint({LOG_MARKER!r} + json.dumps(trainer.state.log_history))"
        )
    )
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        errors = [output for output in cell.outputs if output.output_type == "error"]
        assert not errors, f"cell {index} raised {errors[0].ename}: {errors[0].evalue}"

    streams = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream"
    )
    for noise in (
        "IProgress not found",
        "Setting accelerator to CPU",
    ):  # tqdm's and DeepSpeed's, for unused features
        assert noise not in streams

    shown = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert shown, "the logit-lens profile cell displayed no heatmap"

    printed = "".join(
        output.get("text", "") for output in notebook.cells[-1].outputs if output.output_type == "stream"
    )
    line = next(line for line in printed.splitlines() if line.startswith(LOG_MARKER))
    logs = json.loads(line.removeprefix(LOG_MARKER))
    train_logs = [log for log in logs if "loss" in log]
    assert train_logs, "the student trainer logged no training step"
    assert all("lens_loss" in log and "kd_loss" in log for log in train_logs)
    assert all(any(key.startswith("lens/s") for key in log) for log in train_logs)


@pytest.mark.slow
def test_swap_your_trainer_script_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        cwd=tmp_path,
        env=_env_with_src(dict(os.environ)),
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "lens_loss=" in result.stdout
    assert "layer pairs (student, teacher): [(1, 2), (2, 4)]" in result.stdout
