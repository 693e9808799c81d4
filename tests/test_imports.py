"""The import graph of ``cgpu_kernel``: no cycles, and a sans-I/O core that imports no shell.

The graph is read with ``ast`` from the source, not by importing it, and counts every import a
module can run: at module level and inside functions (an import moved into a function to dodge a
cycle is still a cycle, it only fails later). Imports under ``if TYPE_CHECKING:`` are left out:
they never run.

Importing ``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py``, so an import of a module
is an edge to each package above it too, except the packages above the importer itself (those
are already being imported when the importer runs).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "cgpu_kernel"

#: Cycles allowed for now, each as the frozenset of its modules. Empty: a new cycle fails.
KNOWN_CYCLES: set[frozenset[str]] = set()

#: What the sans-I/O core may never import from its own package.
SHELL_PACKAGES = ("cgpu_kernel.proxy", "cgpu_kernel.backends", "cgpu_kernel.run", "cgpu_kernel.cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, at any depth, outside ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:  # an ``else:`` under it does run
                if isinstance(other, ast.Import | ast.ImportFrom):
                    yield other
                yield from _import_nodes(other)
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _import_nodes(child)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The ``cgpu_kernel`` modules one import statement in ``module`` names."""
    named: set[str] = set()
    if isinstance(node, ast.Import):
        named.update(alias.name for alias in node.names)
    else:
        if node.level:
            is_package = MODULES[module].name == "__init__.py"
            base_parts = module.split(".")
            if not is_package:
                base_parts = base_parts[:-1]
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join([*base_parts, *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        named.add(base)
        # ``from pkg import name``: ``name`` is a submodule when there is one by that name.
        named.update(f"{base}.{alias.name}" for alias in node.names)
    found: set[str] = set()
    for name in named:
        if name not in MODULES:
            continue
        found.add(name)
        found.update(a for a in _ancestors(name) if a not in _ancestors(module) and a != module)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module name -> the ``cgpu_kernel`` modules it may import when it runs."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text("utf-8"), str(path))
        edges: set[str] = set()
        for node in _import_nodes(tree):
            edges |= _targets(module, node)
        graph[module] = edges
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module (each one or more cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def a_cycle(graph: dict[str, set[str]], component: list[str], start: str) -> list[str]:
    """One concrete path ``start -> ... -> start`` inside ``component``, for the failure
    message."""
    members = set(component)
    path = [start]
    seen = {start}
    # Depth-first search for a way back to ``start`` within the component.

    def walk(node: str) -> bool:
        for nxt in sorted(graph[node] & members):
            if nxt == start:
                path.append(start)
                return True
            if nxt not in seen:
                seen.add(nxt)
                path.append(nxt)
                if walk(nxt):
                    return True
                path.pop()
        return False

    walk(start)
    return path


def _rotated(cycle: list[str]) -> list[str]:
    """The same cycle starting at its smallest module, so each is printed once."""
    ring = cycle[:-1]
    first = ring.index(min(ring))
    ring = ring[first:] + ring[:first]
    return [*ring, ring[0]]


def test_the_graph_sees_function_level_imports() -> None:
    """The reader itself: a test that found no edge at all could never fail."""
    graph = import_graph()
    assert "cgpu_kernel.core.wire" in graph["cgpu_kernel.core.journal"]
    assert "cgpu_kernel.exceptions" in graph["cgpu_kernel.core.wire"]
    # ``cli/__init__`` imports ``proxy.options`` inside a function only.
    assert "cgpu_kernel.proxy.options" in graph["cgpu_kernel.cli"]
    # ``registry`` names the Jupyter client under ``if TYPE_CHECKING:`` only: not an edge.
    assert "cgpu_kernel.backends.jupyter" not in graph["cgpu_kernel.backends.registry"]
    # An import in a subpackage also runs the subpackage's ``__init__``.
    assert "cgpu_kernel.proxy" in graph["cgpu_kernel.cli"]


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert a_cycle(graph, ["a", "b", "c"], "a") == ["a", "b", "c", "a"]


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = {frozenset(c): c for c in strongly_connected(graph)}
    new = [c for key, c in cycles.items() if key not in KNOWN_CYCLES]
    gone = [sorted(key) for key in KNOWN_CYCLES if key not in cycles]
    lines = []
    for component in new:
        lines.append(f"{', '.join(component)}:")
        paths = {" -> ".join(_rotated(a_cycle(graph, component, m))) for m in component}
        lines.extend(f"    {p}" for p in sorted(paths))
    assert not new, "import cycles:\n  " + "\n  ".join(lines)
    assert not gone, f"cycles fixed, remove them from KNOWN_CYCLES: {gone}"


def test_core_imports_no_shell() -> None:
    """The sans-I/O core depends on nothing above it: not the proxy, backends, run or CLI."""
    graph = import_graph()
    shells = tuple(p + "." for p in SHELL_PACKAGES)
    leaks = {
        module: sorted(t for t in targets if t in SHELL_PACKAGES or t.startswith(shells))
        for module, targets in graph.items()
        if module.startswith("cgpu_kernel.core")
    }
    assert not {m: t for m, t in leaks.items() if t}
