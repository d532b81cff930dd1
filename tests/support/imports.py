"""The package's import graph, read from the source (no module is imported), and its circles.

Every ``import``/``from … import`` counts, at module level or inside a function: a function-level import
only delays a circle, it does not break it. ``from slimpipe.pkg import name`` counts as an import of the
module that defines ``name`` when the package's ``__init__`` re-exports it from one of its modules (the
package ``__init__`` files themselves are not nodes: importing a package for one name is not a
dependency on all of it).
"""

from __future__ import annotations

import ast
from pathlib import Path

__all__ = ["SRC", "import_graph", "circles"]

SRC = Path(__file__).resolve().parents[2] / "src"


def _modules(src: Path) -> dict[str, Path]:
    out = {}
    for f in sorted(src.rglob("*.py")):
        name = ".".join(f.relative_to(src).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def _targets(mods: dict[str, Path], cur: str, node: ast.Import | ast.ImportFrom) -> list[tuple[str, str]]:
    """(module or package imported, name imported from it) per alias of ``node`` in module ``cur``."""
    if isinstance(node, ast.Import):
        return [(a.name, "") for a in node.names]
    base = node.module or ""
    if node.level:  # relative: from the package of cur
        pkg = cur.split(".") if mods[cur].name == "__init__.py" else cur.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    out = []
    for a in node.names:
        full = f"{base}.{a.name}"
        out.append((full, "") if full in mods else (base, a.name))
    return out


def import_graph(src: Path = SRC, package: str = "slimpipe") -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its body)."""
    mods = _modules(src)
    packages = {n for n, f in mods.items() if f.name == "__init__.py"}
    reexport: dict[tuple[str, str], str] = {}  # (package, name) -> defining module
    for pkg in packages:
        for node in ast.walk(ast.parse(mods[pkg].read_text())):
            if isinstance(node, ast.ImportFrom):
                for (tgt, _), a in zip(_targets(mods, pkg, node), node.names):
                    if tgt in mods and tgt not in packages:
                        reexport[(pkg, a.asname or a.name)] = tgt
    graph: dict[str, set[str]] = {m: set() for m in mods if m not in packages}
    for mod in graph:
        for node in ast.walk(ast.parse(mods[mod].read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for tgt, name in _targets(mods, mod, node):
                if not (tgt == package or tgt.startswith(package + ".")):
                    continue
                tgt = reexport.get((tgt, name), tgt)
                if tgt in graph and tgt != mod:
                    graph[mod].add(tgt)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out)
