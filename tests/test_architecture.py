"""The house as drawn from the imports: no circle, nothing in the library importing the commands, at most ten
floors from the loss math at the bottom to the command line at the top, one door per name."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "distillens_trainer"
COMMAND_LAYER = ("distillens_trainer.commands", "distillens_trainer.cli")
MAX_FLOORS = 10


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Modules of the package that ``name`` imports, anywhere in the file (a lazy import counts)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            stem = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{stem}.{alias.name}" for alias in node.names] + [stem]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


@cache
def _floor(name: str, path: tuple[str, ...] = ()) -> int:
    if name in path:
        raise AssertionError(f"import circle: {' -> '.join((*path, name))}")
    return 1 + max((_floor(other, (*path, name)) for other in GRAPH[name]), default=0)


def test_no_module_imports_itself_back_through_a_circle():
    for name in MODULES:
        _floor(name)


def test_the_house_has_at_most_ten_floors_from_the_divergences_to_the_command_line():
    floors = {name: _floor(name) for name in MODULES}
    assert floors["distillens_trainer.loss.divergences"] == 1
    assert max(floors.values()) <= MAX_FLOORS, sorted(floors.items(), key=lambda item: -item[1])[:5]


@pytest.mark.parametrize("name", sorted(name for name in MODULES if not name.startswith(COMMAND_LAYER)))
def test_no_library_module_imports_a_command(name):
    assert not {other for other in GRAPH[name] if other.startswith(COMMAND_LAYER)}


def test_library_modules_import_names_where_they_are_defined_not_through_a_package_face():
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    for name, path in MODULES.items():
        if path.name == "__init__.py":
            continue  # a package's face re-exports its public names
        through_a_face = GRAPH[name] & packages - {"distillens_trainer"}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                stem = node.module
                imported = {f"{stem}.{alias.name}" for alias in node.names}
                # `from ..data import building` imports a module, not a name through the face
                assert not (
                    any(f".{stem}" in f".{face}" for face in through_a_face)
                    and not all(any(target.endswith(i) for target in MODULES) for i in imported)
                ), f"{name} imports through the face of {stem}"
