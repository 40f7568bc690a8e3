"""The project's import graph, read from the source with ``ast``: ``python tests/import_graph.py``.

Prints the counts the layering contract is about: imports that point up the floors drawn in
``docs/ARCHITECTURE.md``, import cycles between modules, project imports inside function bodies,
and ``view: Any`` annotations. ``tests/test_layers.py`` asserts on the same data, so the numbers a
maintainer prints are the ones CI checks; ``lint-imports`` enforces the floors independently.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fgmf_marl",)
#: floors, top first: a module may import its own floor and the floors below it
FLOORS = ("fgmf_marl.jobs", "fgmf_marl.experiments", "fgmf_marl.teams", "fgmf_marl.agents", "fgmf_marl.envs",
          "fgmf_marl")


@dataclass
class Import:
    source: str       # importing module
    target: str       # imported project module
    line: int
    in_function: bool


@dataclass
class Graph:
    modules: list[str] = field(default_factory=list)
    imports: list[Import] = field(default_factory=list)
    view_any: int = 0


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def floor(module: str) -> int:
    """Index into FLOORS (0 = top); ``jobs``, ``experiments`` and ``teams`` before the rest of ``fgmf_marl``."""
    for i, prefix in enumerate(FLOORS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    raise ValueError(f"{module} is on no floor")


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _project_target(name: str, known: set[str]) -> str | None:
    """The longest known project module that ``name`` is or lies in (None for third-party)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def build() -> Graph:
    graph = Graph()
    files = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    graph.modules = [module_name(p) for p in files]
    known = set(graph.modules)
    for path in files:
        module = module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        graph.view_any += sum(1 for n in ast.walk(tree) if isinstance(n, ast.arg) and n.arg == "view"
                              and isinstance(n.annotation, ast.Name) and n.annotation.id == "Any")

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = _resolve(child, module, path.name == "__init__.py")
                    names = [f"{base}.{a.name}" for a in child.names] if base else []
                else:
                    visit(child, inside)
                    continue
                targets = {t for t in (_project_target(name, known) for name in names) if t not in (None, module)}
                for target in sorted(targets):
                    graph.imports.append(Import(module, target, child.lineno, inside))

        visit(tree, False)
    return graph


def upward(graph: Graph) -> list[Import]:
    """Imports from a floor to one above it (``fgmf_marl.certify`` -> ``fgmf_marl.envs``, ``fgmf_marl.envs`` -> ``fgmf_marl.agents``, ...)."""
    return [i for i in graph.imports if floor(i.target) < floor(i.source)]


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    edges: dict[str, set[str]] = {m: set() for m in graph.modules}
    for i in graph.imports:
        edges[i.source].add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
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

    sys.setrecursionlimit(10_000)
    for v in graph.modules:
        if v not in index:
            strongconnect(v)
    # a package importing its own submodules (``__init__`` re-exports) is not a cycle of concern
    return [c for c in found if not all(m.startswith(c[0] + ".") or m == c[0] for m in c)]


def main() -> int:
    graph = build()
    up = upward(graph)
    cyc = cycles(graph)
    inner = [i for i in graph.imports if i.in_function]
    print(f"modules: {len(graph.modules)}  project imports: {len(graph.imports)}")
    print(f"upward imports (against the floors {' > '.join(FLOORS)}): {len(up)}")
    for i in up:
        print(f"    {i.source}:{i.line} -> {i.target}")
    print(f"import cycles: {len(cyc)}")
    for c in cyc:
        print("    " + " <-> ".join(c))
    print(f"project imports inside function bodies: {len(inner)}")
    for i in inner:
        print(f"    {i.source}:{i.line} -> {i.target}")
    print(f"'view: Any' annotations: {graph.view_any}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
