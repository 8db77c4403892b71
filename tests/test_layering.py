"""The import graph: dependencies point one way, ``core ← router ← trainer ← gateway ← harness ← cli``.

Every ``import`` in the product's packages is read with ``ast`` (function-level imports
included, since a deferred import is still a dependency), so the rule holds after whoever
edits the code next.
"""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["core", "router", "trainer", "gateway", "harness", "cli"]
LEVEL = {package: level for level, package in enumerate(LAYERS)}
# Frameworks a package must never import, at any depth.
FORBIDDEN = {"core": {"fastapi", "torch", "transformers", "peft"}, "router": {"fastapi"}, "trainer": {"fastapi"}}


def _parse(path: Path) -> ast.Module:
    # No garbage collection while the AST is built: a finalizer of an earlier test's object
    # warning mid-build (warnings are errors here) breaks CPython's AST constructor.
    gc.disable()
    try:
        return ast.parse(path.read_text(), str(path))
    finally:
        gc.enable()


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every absolute import in ``path``."""
    found = []
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def violations(package: str) -> list[str]:
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line} imports {module}"
            if top in LEVEL and LEVEL[top] > LEVEL[package]:
                problems.append(f"{where} (a layer above {package})")
            if top in FORBIDDEN.get(package, set()):
                problems.append(f"{where} (forbidden in {package})")
    return problems


@pytest.mark.parametrize("package", LAYERS)
def test_no_package_imports_one_above_it(package: str) -> None:
    assert violations(package) == []


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "example.py"
    module.write_text("def later():\n    from gateway.app import create_app\n")
    assert imported_modules(module) == [(2, "gateway.app")]


def test_every_product_package_is_in_a_layer() -> None:
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages == set(LAYERS)
