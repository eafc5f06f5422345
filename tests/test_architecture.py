"""The layers hold: import-linter's contracts (pyproject.toml), no import circle, settings
read only at the edges, and docs/architecture.md's picture is the code's."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent

DEEP = [
    "engine",
    "storage",
    "records",
    "notifications",
    "contract",
    "worker/tasks.py",
    "worker/delivery.py",
    "worker/gather.py",
    "worker/intake.py",
    "worker/configured.py",
]
"""Where no code reads the environment's settings: they are passed down from an edge."""


def _contract_ids() -> list[str]:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [contract["id"] for contract in config["tool"]["importlinter"]["contracts"]]


def _lint_imports(*contracts: str) -> subprocess.CompletedProcess[str]:
    arguments = [arg for contract in contracts for arg in ("--contract", contract)]
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())",
            "--no-cache",
            *arguments,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_import_contracts_hold() -> None:
    kept = _contract_ids()
    result = _lint_imports(*kept)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(kept)} kept, 0 broken" in result.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (child, iter(sorted(graph.find_modules_directly_imported_by(child))))
                    )
                elif child in on_stack:
                    low[module] = min(low[module], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[module])
            if low[module] == index[module]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == module:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circle_between_modules() -> None:
    """Any import counts: inside functions and under TYPE_CHECKING too."""
    sys.path.insert(0, str(ROOT))
    try:
        graph = grimp.build_graph("creditworker", "producers", cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))
    assert _cycles(graph) == []


def test_the_circle_finder_finds_a_circle() -> None:
    graph = grimp.ImportGraph()
    for module in ("a", "a.one", "a.two", "a.three"):
        graph.add_module(module)
    graph.add_import(importer="a.one", imported="a.two")
    graph.add_import(importer="a.two", imported="a.one")
    graph.add_import(importer="a.three", imported="a.one")
    assert _cycles(graph) == [["a.one", "a.two"]]


def test_nothing_below_the_edges_reads_the_settings() -> None:
    readers = []
    for room in DEEP:
        path = ROOT / "creditworker" / room
        for source in sorted([path] if path.is_file() else path.rglob("*.py")):
            for node in ast.walk(ast.parse(source.read_text())):
                name = (
                    node.id
                    if isinstance(node, ast.Name)
                    else node.attr
                    if isinstance(node, ast.Attribute)
                    else None
                )
                if name == "get_settings":
                    readers.append(f"{source.relative_to(ROOT)}:{node.lineno}")
    assert readers == []


def test_the_picture_in_docs_architecture_is_the_code() -> None:
    result = subprocess.run(
        [sys.executable, "docs/import_graph.py", "--check"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
