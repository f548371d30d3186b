"""The rso_ext package has no import cycles.

Every module of the package is read with ``ast`` (nothing is imported): module-level imports and
imports inside functions or classes, relative (``from .x import y``, ``from .. import z``) and
absolute (``import rso_ext.x``, ``from rso_ext.x import y``). An import of ``a.b.c`` also runs
the ``__init__`` of each package on the way (``a.b``) unless the importer is inside it already,
so that counts as an import of the package too. ``rso_ext/__init__.py``'s own imports are left
out: they re-export the public names and run first, before any module they name.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "rso_ext"
PACKAGE = "rso_ext"


def _modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package) for every .py file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    assert package in out, f"no {package}/__init__.py under {root.parent}"
    return out


def _imported(tree: ast.AST, name: str, is_pkg: bool, modules, package: str) -> dict[str, int]:
    """The package's modules that module ``name`` imports -> line of the first such import."""
    here = name if is_pkg else name.rpartition(".")[0]          # package of relative imports
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        while target and target not in modules:                 # rso_ext._C, a function, ...
            target = target.rpartition(".")[0]
        if not target:
            return
        # the packages the import runs on the way, unless the importer is already inside them
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            pkg = ".".join(parts[:i])
            inside = name == pkg or name.startswith(pkg + ".")
            if pkg in modules and (pkg == target or not inside):
                found.setdefault(pkg, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod != package and not mod.startswith(package + "."):
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                add(sub if sub in modules else mod, node.lineno)
    found.pop(name, None)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """Module -> {imported module of the package: line}; the root package's own imports are
    left out (its re-exports)."""
    modules = _modules(root, package)
    graph = {}
    for name, (path, is_pkg) in modules.items():
        if name == package:
            graph[name] = {}
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = _imported(tree, name, is_pkg, modules, package)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle through each strongly connected component with more than one module (Tarjan),
    as ``[a, b, ..., a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    out = []
    for comp in components:                  # a shortest way back to the first module
        start = min(comp)
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        cycle = paths[v] + [start]
                        break
                    if w in comp and w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if cycle:
                    break
            frontier = nxt
        out.append(cycle)
    return sorted(out)


def _describe(cycle: list[str], graph) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + \
        f" -> {cycle[-1]}"


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) >= 20 and sum(map(len, graph.values())) >= 30   # it did read the package
    found = cycles(graph)
    assert not found, "import cycles in rso_ext:\n" + "\n".join(_describe(c, graph)
                                                                  for c in found)


def test_the_fused_package_imports_one_way():
    graph = import_graph()
    fused = {m: deps for m, deps in graph.items() if m.startswith("rso_ext.fused")}
    assert {"rso_ext.fused.program", "rso_ext.fused.lower_sequential",
            "rso_ext.fused.lower_graph", "rso_ext.fused.sweeper"} <= set(fused)
    for m, deps in fused.items():
        assert "rso_ext.rso" not in deps, f"{m} imports rso_ext.rso"
    assert not {"rso_ext.fused.lower_sequential", "rso_ext.fused.lower_graph",
                "rso_ext.fused.sweeper"} & set(graph["rso_ext.fused.program"])
    assert "rso_ext.fused.sweeper" not in graph["rso_ext.fused.lower_sequential"]
    assert "rso_ext.fused.sweeper" not in graph["rso_ext.fused.lower_graph"]


@pytest.mark.parametrize("files, expected", [
    # a relative import inside a function closes the cycle
    ({"a.py": "from . import b\n", "b.py": "def f():\n    from .a import g\n"},
     [["pkg.a", "pkg.b", "pkg.a"]]),
    # an absolute import of a submodule runs its package's __init__, which imports back
    ({"sub/__init__.py": "from .x import y\n", "sub/x.py": "import pkg.c\ny = 1\n",
      "sub/z.py": "w = 1\n", "c.py": "from pkg.sub.z import w\n"},
     [["pkg.c", "pkg.sub", "pkg.sub.x", "pkg.c"]]),
    # a submodule importing its sibling does not count its own package's __init__
    ({"sub/__init__.py": "from .x import y\nfrom .z import w\n", "sub/x.py": "from .z import w\n",
      "sub/z.py": "w = 1\n"}, []),
    # the root package's re-exports are left out
    ({"__init__.py": "from .a import f\n", "a.py": "from pkg import _C\n"}, []),
])
def test_cycles_are_found_and_named(tmp_path, files, expected):
    root = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    graph = import_graph(root, "pkg")
    assert cycles(graph) == expected
    if expected:
        assert _describe(expected[0], graph).startswith(f"{expected[0][0]} (line ")
