"""The README's front door works as written: its quickstart runs offline, its set-up commands and links hold."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SET_UP_COMMANDS = (
    'pip install torch==2.13.0 -e ".[demo]" && distillens demo --output_dir runs/demo',
    'pip install torch==2.13.0 -e ".[dev]" && python -m pytest',
)
QUICKSTART_LINES = 60  # a reader sees the swap without scrolling far


def python_blocks(markdown: str) -> list[str]:
    """The bodies of the ```python fenced blocks of ``markdown``, in order."""
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.DOTALL | re.MULTILINE)


def test_the_quickstart_comes_first_and_the_set_up_commands_are_unchanged():
    text = README.read_text(encoding="utf-8")
    head = "\n".join(text.splitlines()[:QUICKSTART_LINES])
    assert "DistillLensTrainer(" in head and "```python" in head
    for command in SET_UP_COMMANDS:
        assert command in text


def test_every_local_link_of_the_readme_exists():
    text = README.read_text(encoding="utf-8")
    targets = {target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", text)}
    local = sorted(target for target in targets if target and "://" not in target)
    assert local, "the README links no page"
    assert [target for target in local if not (REPO / target).exists()] == []
    docs = {f"docs/{page.name}" for page in (REPO / "docs").glob("*.md")}
    assert docs - targets == set(), "the documentation index misses a page"


def test_the_quickstart_runs_as_written(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "the README has no python block"
    monkeypatch.chdir(tmp_path)  # it writes runs/quickstart
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(blocks[0], f"{README}:quickstart", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == trainer.args.max_steps
    logged = [entry for entry in trainer.state.log_history if "lens_loss" in entry]
    assert logged and all(entry["kd_loss"] >= 0 and entry["lens_loss"] >= 0 for entry in logged)
    assert trainer.layer_map == [(1, 2)]
