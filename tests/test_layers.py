"""The package layout is the layering: shards, then pipelines, then the engine's library, then its
commands (docs/DESIGN.md, "Layout"). A module imports only from its own layer or the ones below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# each layer and the packages it must not import (the ones above it)
LAYERS = {
    "shards": ("pipelines", "engine"),
    "pipelines": ("engine",),
    "engine": ("engine.commands",),
}


def imported_modules(source: str, package: str) -> set[str]:
    """Every module ``source`` (a module of ``package``) imports, at the top or inside a function,
    with relative imports resolved."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def library_modules(layer: str) -> list[Path]:
    return [path for path in sorted((REPO / layer).rglob("*.py")) if "commands" not in path.relative_to(REPO).parts]


def above(module: str, forbidden: tuple[str, ...]) -> bool:
    return any(module == name or module.startswith(f"{name}.") for name in forbidden)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_no_module_imports_from_a_layer_above_its_own(layer: str) -> None:
    upward = {
        str(path.relative_to(REPO)): sorted(
            m
            for m in imported_modules(path.read_text(encoding="utf-8"), ".".join(path.relative_to(REPO).parts[:-1]))
            if above(m, LAYERS[layer])
        )
        for path in library_modules(layer)
    }
    assert not {path: modules for path, modules in upward.items() if modules}


def test_the_scan_sees_an_upward_import_in_every_form() -> None:
    source = (
        "from engine.commands.report import find_runs\n"
        "import engine.commands.run\n"
        "def later():\n    from .commands import demo\n"
    )
    found = {m for m in imported_modules(source, "engine") if above(m, LAYERS["engine"])}
    assert {"engine.commands.report", "engine.commands.run", "engine.commands.demo"} <= found
    assert not {
        m for m in imported_modules("from engine.config import RunConfig\n", "engine") if above(m, ("engine.commands",))
    }


def test_no_test_file_imports_another_test_file() -> None:
    """Shared fixtures live in tests/conftest.py and helpers in tests/helpers.py: a test file that
    imports another runs that file's module fixtures and breaks when it is reorganised."""
    offenders = [
        f"{path.name} imports {name}"
        for path in sorted((REPO / "tests").glob("*.py"))
        for name in imported_modules(path.read_text(), "tests")
        if name.split(".")[0].startswith("test_")
    ]
    assert not offenders, offenders
