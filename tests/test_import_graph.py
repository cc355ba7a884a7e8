"""rgeom's modules import each other without cycles.

The graph is read from the source (no imports run), and it counts every import: those at
the top of a module and those inside functions. A function-level import may defer torch
until a stage needs it, but it must not hide a cycle: a cycle means two modules each need
the other, so neither can be read, tested or moved alone. ``TYPE_CHECKING`` blocks are left
out (annotations only).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rgeom"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    return skipped


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The rgeom modules ``path`` imports (``from a import b`` counts ``a.b`` if a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            # ``from package import submodule`` needs the submodule, not what the
            # package's __init__ re-exports; any other name needs ``base`` itself.
            needs_base = any(m not in modules for m in submodules)
            targets = [base] * needs_base + submodules
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports():
    graph = import_graph()
    assert "rgeom.errors" in graph["rgeom.config"]
    # A function-level import counts too.
    assert any("rgeom.models" in deps for deps in graph.values())
    # `from rgeom.judges import harmfulness` needs that submodule, not the package's
    # __init__ (which re-exports the judges' submodules).
    assert "rgeom.judges.harmfulness" in graph["rgeom.judges.labels"]
    assert "rgeom.judges" not in graph["rgeom.judges.labels"]


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    edges = [
        f"  {a} -> {b}"
        for component in found
        for a in component
        for b in sorted(graph[a])
        if b in component
    ]
    assert not found, "import cycles in rgeom, by the edges inside them:\n" + "\n".join(edges)
