"""The layout as ARCHITECTURE.md draws it: every module has its line in the table, and no
two batchtag modules import each other, directly or around a circle (imports inside
functions count: they hide a cycle, they do not break it)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "batchtag"


def module_files() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The batchtag modules ``path`` imports anywhere in its body; ``from pkg import name``
    names the module ``pkg.name`` when there is one, else ``pkg``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                found.add(
                    f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                )
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in module_files()}
    names = set(files)
    return {name: imported_modules(path, names) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as the list of modules around it), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_among_batchtag_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from batchtag.b import x\n")
    graph = {
        "batchtag.a": imported_modules(module, {"batchtag.a", "batchtag.b"}),
        "batchtag.b": {"batchtag.a"},
    }
    assert find_cycle(graph) == ["batchtag.a", "batchtag.b", "batchtag.a"]


def test_every_module_has_its_line_in_architecture_md():
    table = set(re.findall(r"^\| `(batchtag/[\w/]+\.py)` \|", (REPO / "ARCHITECTURE.md").read_text(), re.M))
    modules = {str(path.relative_to(REPO)) for path in module_files()}
    assert sorted(modules - table) == [], "modules missing from ARCHITECTURE.md's table"
    assert sorted(table - modules) == [], "ARCHITECTURE.md's table names modules that are gone"
