"""The import graph of the project (tests excluded), read from the source with ``ast``: imports
go down the layers only, and no files import each other in a circle.

Every ``import`` and ``from ... import`` counts, at the top of a file or inside a function: an
import moved into a function to dodge a circle is still one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The layers, lowest first. A package may import its own modules and any package of a lower layer;
# packages that share a layer do not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("util",),
    ("data", "model", "loss", "evaluation"),
    ("configs",),
    ("trainer",),
    ("deploy",),
    ("mambaad",),  # the Python API, mambaad.py
    ("run", "tools"),
)
LAYER = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file outside tests and hidden folders."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] in ("tests", "runs", "datasets") or any(p.startswith(".") for p in parts):
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (the longest known prefix of each imported name)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for imported in names:
                while imported and imported not in modules:
                    imported = imported.rpartition(".")[0]
                if imported and imported != name:
                    targets.add(imported)
        graph[name] = targets
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for each import of a package at the same or a higher layer (not its own)."""
    bad = []
    for source, targets in graph.items():
        src = source.split(".")[0]
        for target in sorted(targets):
            dst = target.split(".")[0]
            if src != dst and LAYER[dst] >= LAYER[src]:
                bad.append(f"{source} -> {target}")
    return bad


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that reach each other through imports (Tarjan's strongly connected
    components with more than one module, or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(project_modules())


def test_every_package_has_a_layer(graph: dict[str, set[str]]) -> None:
    packages = {name.split(".")[0] for name in graph}
    assert packages <= set(LAYER), f"give these a layer in LAYERS: {sorted(packages - set(LAYER))}"
    assert len(graph) > 60 and any(graph.values())


def test_imports_go_down_the_layers_only(graph: dict[str, set[str]]) -> None:
    assert upward_imports(graph) == []


def test_no_circle_of_imports(graph: dict[str, set[str]]) -> None:
    assert import_circles(graph) == []


def test_the_checks_find_what_they_look_for(tmp_path: Path) -> None:
    # an upward import and a circle hidden inside a function, in a tree of three small files
    (tmp_path / "util").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "util" / "__init__.py").write_text("")
    (tmp_path / "model" / "__init__.py").write_text("")
    (tmp_path / "util" / "a.py").write_text("def f():\n    from model.b import g\n")
    (tmp_path / "model" / "b.py").write_text("from model import c\n")
    (tmp_path / "model" / "c.py").write_text("def h():\n    from . import b\n")
    found = import_graph(project_modules(tmp_path))
    assert found["util.a"] == {"model.b"} and found["model.c"] == {"model", "model.b"}
    assert upward_imports(found) == ["util.a -> model.b"]
    assert import_circles(found) == [["model.b", "model.c"]]
