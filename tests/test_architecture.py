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


# ------------------------------------------------------------------------------------ the packages and the loss core
TOP_LEVEL_MODULES_AT_MOST = 6
# The loss core reads model facts (unwrapping, the ignore index) and FSDP's hook-free call; nothing above it.
LOSS_CORE_MAY_IMPORT = (
    "distillens_trainer.loss",
    "distillens_trainer.models.facts",
    "distillens_trainer.distributed.fsdp",
)


def test_the_package_top_level_holds_at_most_six_modules_beside_the_packages():
    loose = sorted(path.name for path in PACKAGE.glob("*.py") if path.name != "__init__.py")
    assert len(loose) <= TOP_LEVEL_MODULES_AT_MOST, loose


def test_the_loss_core_and_the_teacher_are_packages_and_the_demo_lives_beside_the_library():
    assert (PACKAGE / "loss" / "__init__.py").is_file()
    assert (PACKAGE / "teacher" / "__init__.py").is_file()
    assert (PACKAGE.parent / "distillens_demo" / "__init__.py").is_file()
    assert not (PACKAGE / "demo").exists()


def _absolute_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize(
    "name", sorted(name for name in MODULES if name.startswith("distillens_trainer.loss"))
)
def test_the_loss_core_takes_tensors_not_trainers_datasets_or_files(name):
    path = MODULES[name]
    imports = _absolute_imports(path)
    assert not {i for i in imports if i == "datasets" or i.startswith("datasets.")}, imports
    assert "transformers.Trainer" not in imports and "transformers.trainer" not in {
        i.rsplit(".", 1)[0] for i in imports
    }, imports
    below = {m for m in GRAPH[name] if not m.startswith(LOSS_CORE_MAY_IMPORT)}
    assert not below, f"{name} imports from above the loss core: {sorted(below)}"
    calls = {
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call)
    }
    assert not calls & {
        "open",
        "read_text",
        "write_text",
        "read_bytes",
        "write_bytes",
        "save_file",
        "load_file",
    }


@pytest.mark.parametrize("name", sorted(name for name in MODULES if not name.startswith(COMMAND_LAYER)))
def test_no_library_module_imports_the_demo(name):
    assert not {i for i in _absolute_imports(MODULES[name]) if i.split(".")[0] == "distillens_demo"}


if __name__ == "__main__":  # python tests/test_architecture.py: the floors, top first
    by_floor: dict[int, list[str]] = {}
    for module in MODULES:
        by_floor.setdefault(_floor(module), []).append(module.removeprefix("distillens_trainer."))
    for floor in sorted(by_floor, reverse=True):
        print(f"{floor:>2}  {', '.join(sorted(by_floor[floor]))}")
