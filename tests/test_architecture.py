"""The shape of the package: no import cycles inside ``bgtasks``, no oversized modules.

The import graph is read from the source with ``ast``, without importing
anything. Every ``import`` counts, at module level or inside a function, except
those under ``if TYPE_CHECKING:``, which never run. ``from pkg import name``
points at ``pkg.name`` when that is a module, else at ``pkg`` itself; importing
a submodule is not counted as importing its package's ``__init__``.

A cycle is reported as the import edges inside a strongly connected part of
the graph. Edges known today are listed in ``KNOWN_CYCLE_EDGES``, and modules
known to be too long in ``KNOWN_LONG_MODULES``: the redesign of issue 11 is
removing them, and the lead empties both lists as it lands. Any edge or module
not listed fails; an entry that no longer offends fails too, so the lists only
shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bgtasks"
MAX_LINES = 620

# Import edges (importer -> imported) allowed on a cycle: none since the
# redesign of issue 11; do not add to this list.
KNOWN_CYCLE_EDGES: frozenset[tuple[str, str]] = frozenset()

# Modules allowed over MAX_LINES: none since issue 11; do not add to this list.
KNOWN_LONG_MODULES: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Module:
    name: str  # dotted: bgtasks._process.pool
    path: Path
    is_package: bool


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int


def _modules(package: Path) -> dict[str, Module]:
    found: dict[str, Module] = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        name = ".".join(parts)
        found[name] = Module(name, path, is_package)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _runnable_imports(nodes: Iterable[ast.AST]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: all but those under ``if TYPE_CHECKING:``."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _runnable_imports(node.orelse)
        else:
            yield from _runnable_imports(ast.iter_child_nodes(node))


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names before ``import``."""
    if node.level == 0:
        return node.module or ""
    parts = module.name.split(".")
    if not module.is_package:
        parts.pop()
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    if node.module:
        parts += node.module.split(".")
    return ".".join(parts)


def _edges(modules: dict[str, Module]) -> list[Edge]:
    edges: list[Edge] = []
    for module in modules.values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"), str(module.path))
        for node in _runnable_imports([tree]):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(module, node)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in targets:
                # ``import bgtasks.a.b`` imports a module even when bound as bgtasks
                while target and target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != module.name:
                    edges.append(Edge(module.name, target, node.lineno))
    return edges


def _strongly_connected(nodes: list[str], edges: list[Edge]) -> list[set[str]]:
    """The parts of the graph with more than one module, each a set (Tarjan)."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for edge in edges:
        succ[edge.importer].append(edge.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    parts: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in succ[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part: set[str] = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                part.add(top)
                if top == node:
                    break
            if len(part) > 1:
                parts.append(part)

    for node in nodes:
        if node not in index:
            visit(node)
    return parts


def _cycle_edges(package: Path = PACKAGE) -> list[Edge]:
    """Every import edge that lies on a cycle."""
    modules = _modules(package)
    edges = _edges(modules)
    parts = _strongly_connected(sorted(modules), edges)
    part_of = {name: i for i, part in enumerate(parts) for name in part}
    return [
        e for e in edges if e.importer in part_of and part_of[e.importer] == part_of.get(e.imported)
    ]


def _line_counts(package: Path = PACKAGE) -> dict[str, int]:
    return {
        path.relative_to(package.parent).as_posix(): len(
            path.read_text(encoding="utf-8").splitlines()
        )
        for path in sorted(package.rglob("*.py"))
    }


def test_no_new_import_cycles() -> None:
    new: dict[tuple[str, str], set[int]] = {}
    for e in _cycle_edges():
        if (e.importer, e.imported) not in KNOWN_CYCLE_EDGES:
            new.setdefault((e.importer, e.imported), set()).add(e.line)
    assert not new, "imports that close a cycle inside bgtasks:\n" + "\n".join(
        f"  {a} -> {b} (line {', '.join(map(str, sorted(lines)))})"
        for (a, b), lines in sorted(new.items())
    )


def test_no_new_long_modules() -> None:
    long = {name: n for name, n in _line_counts().items() if n > MAX_LINES}
    new = sorted(set(long) - KNOWN_LONG_MODULES)
    assert not new, f"modules over {MAX_LINES} lines; split them along their seams:\n" + (
        "\n".join(f"  {name}: {long[name]} lines" for name in new)
    )


def test_allow_lists_hold_no_fixed_offenders() -> None:
    on_cycles = {(e.importer, e.imported) for e in _cycle_edges()}
    counts = _line_counts()
    fixed = [f"  KNOWN_CYCLE_EDGES: {a} -> {b}" for a, b in sorted(KNOWN_CYCLE_EDGES - on_cycles)]
    fixed += [
        f"  KNOWN_LONG_MODULES: {name}"
        for name in sorted(KNOWN_LONG_MODULES)
        if counts.get(name, 0) <= MAX_LINES
    ]
    assert not fixed, "no longer offending; remove from tests/test_architecture.py:\n" + (
        "\n".join(fixed)
    )


def test_the_walk_counts_imports_in_functions_and_skips_type_checking(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import A as A\n",
        "a.py": "from . import b\nA = 1\n",
        "b.py": "def f():\n    from .a import A\n    return A\n",  # a <-> b, in a function
        "c.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from .d import D\n"
            "else:\n    import pkg.sub.e\n"
        ),
        "d.py": "from .c import *\nD = 1\n",  # c -> d only for the type checker
        "sub/__init__.py": "",
        "sub/e.py": "from .. import c\n",  # c <-> sub.e, through else: and ..
    }
    for name, text in files.items():
        (pkg / name).write_text(text, encoding="utf-8")
    found = {(e.importer, e.imported) for e in _cycle_edges(pkg)}
    assert found == {
        ("pkg.a", "pkg.b"),
        ("pkg.b", "pkg.a"),
        ("pkg.c", "pkg.sub.e"),
        ("pkg.sub.e", "pkg.c"),
    }
    assert _line_counts(pkg)["pkg/c.py"] == 5


def test_the_runtime_is_a_thin_facade() -> None:
    lines = _line_counts()["bgtasks/_runtime.py"]
    assert lines <= 450, "Runtime is a façade: move the work into its parts"
