"""The code's shape: no import cycle in trainer/, data/ or models/ (function-level imports
count: a cycle that only works because one side imports late is still a cycle).

Read from the source with `ast`, nothing imported: a cycle is found even on a path no test runs.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.quick

PACKAGES = ("trainer", "data", "models")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path = REPO) -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (root / package).rglob("*.py")}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere (top level or inside functions), except
    under `if TYPE_CHECKING:`, which never runs."""
    names: set[str] = set()
    pending = list(ast.parse(path.read_text()).body)
    while pending:
        node = pending.pop()
        if _is_type_checking(node):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        pending.extend(ast.iter_child_nodes(node))
    return {name for name in names if name in known}


def import_cycles(modules: dict[str, Path], group=lambda name: name) -> list[list[str]]:
    """Strongly connected groups of more than one node in the import graph (Tarjan), its
    nodes the modules or, with `group`, what group(module) names (e.g. its package)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph.setdefault(group(name), set()).update(
            group(other) for other in imported_modules(path, set(modules)))
    graph = {node: targets - {node} for node, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for other in graph[name]:
            if other not in index:
                visit(other)
                low[name] = min(low[name], low[other])
            elif other in stack:
                low[name] = min(low[name], index[other])
        if low[name] == index[name]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == name:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return cycles


def test_no_import_cycle_in_trainer_data_or_models():
    assert import_cycles(_modules()) == []


def _trainer_package(name: str) -> str:
    """trainer.loop.step -> trainer.loop; trainer.main -> trainer (the top level)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "trainer" and len(parts) > 2 else parts[0]


def test_the_trainer_packages_import_one_way():
    """trainer.loop uses trainer.state (the run folder), trainer.report (plain values in,
    lines and summaries out) and trainer.tools; none of those imports the loop back."""
    trainer_modules = {name: path for name, path in _modules().items()
                       if name.startswith("trainer.") and name.count(".") >= 2}
    assert import_cycles(trainer_modules, group=_trainer_package) == []


def test_a_function_level_import_cycle_is_found(tmp_path, monkeypatch):
    """The check itself, on a two-module package where one side imports late."""
    package = tmp_path / "data"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from data import b\n")
    (package / "b.py").write_text("def late():\n    from data.a import thing\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\n"
                                  "if TYPE_CHECKING:\n    from data import a\n")
    monkeypatch.setattr("tests.test_structure.REPO", tmp_path)
    assert import_cycles({_module_name(p): p for p in package.glob("*.py")}) == [
        ["data.a", "data.b"]]
