"""The import graph of the library (every `import`, at module level or inside a function, read from the
sources with `ast`): no circles, and the layers import one way only (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import os

import pytest

# The sources: this tree's, or (`make test` runs a copy of tests/ outside it) the tree ETKD_SOURCE_TREE names.
ROOT = os.environ.get("ETKD_SOURCE_TREE") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# source folder -> installed package name (setup.py's package_dir); the more specific folder first
FOLDERS = {
    "models/hf_integration": "etkd.hf",
    "etkd_kernels": "etkd_kernels",
    "models": "etkd.models",
    "distill": "etkd.distill",
    "benchmarks": "etkd.benchmarks",
}
NOT_LIBRARY = ("benchmarks/suite",)  # `make bench`, not installed


def modules() -> dict[str, tuple[str, bool]]:
    """Installed module name -> (source path, is a package __init__)."""
    found: dict[str, tuple[str, bool]] = {}
    for folder, name in FOLDERS.items():
        top = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(top):
            rel = os.path.relpath(dirpath, ROOT)
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if any(rel == n or rel.startswith(n + os.sep) for n in NOT_LIBRARY):
                continue
            if any(
                rel.startswith(f + os.sep) or rel == f
                for f in FOLDERS
                if f != folder and f.startswith(folder)
            ):
                continue  # a nested folder installed under another name (models/hf_integration)
            parts = [] if dirpath == top else os.path.relpath(dirpath, top).split(os.sep)
            for f in filenames:
                if f.endswith(".py"):
                    stem = f[:-3]
                    mod = ".".join([name, *parts] + ([] if stem == "__init__" else [stem]))
                    found[mod] = (os.path.join(dirpath, f), stem == "__init__")
    return found


def _owner(name: str, mods) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the library modules it imports (`from pkg import sub` counts as an edge to pkg.sub)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for mod, (path, is_pkg) in mods.items():
        package = mod if is_pkg else mod.rpartition(".")[0]
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges.update(filter(None, (_owner(a.name, mods) for a in node.names)))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                for a in node.names:
                    full = f"{target}.{a.name}"
                    edges.add(full if full in mods else _owner(target, mods))
        edges.discard(None)
        edges.discard(mod)
        graph[mod] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    graph = import_graph()
    # a few edges every version of the tree has: the reader must see them, or the checks below prove nothing
    assert "etkd_kernels.dispatch" in graph["etkd_kernels"]
    assert "etkd.models.encoder" in graph["etkd.models"]
    assert any(m.startswith("etkd_kernels") for m in graph["etkd.models.patterns.full"])


def test_the_circle_finder_finds_circles():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert circles(g) == [["a", "b", "c"]]


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles (an import inside a function counts too): " + "; ".join(
        " <-> ".join(c) for c in found
    )


# Each layer may import the ones to its left only (ARCHITECTURE.md): layer name -> what it may not import.
FORBIDDEN = {
    "etkd_kernels": ("etkd.models", "etkd.hf", "etkd.distill", "etkd.benchmarks"),
    "etkd.hf": ("etkd.distill", "etkd.benchmarks"),
    "etkd.models": ("etkd.distill", "etkd.benchmarks"),
}


def _within(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def imports_into(package: str, forbidden) -> list[str]:
    """Every import of a module of `package` that lands in one of the `forbidden` packages."""
    graph = import_graph()
    return [f"{m} imports {t}" for m in sorted(graph) if _within(m, [package])
            for t in sorted(graph[m]) if _within(t, forbidden)]  # fmt: skip


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_one_way(layer):
    assert not imports_into(layer, FORBIDDEN[layer])


BACKEND_PACKAGES = ("etkd_kernels.reference", "etkd_kernels.cpu", "etkd_kernels.triton", "etkd_kernels.cuda")


@pytest.mark.parametrize("backend", BACKEND_PACKAGES[1:])
def test_fused_backends_share_math_through_shared_only(backend):
    """A fused backend never imports the oracle or another backend (ARCHITECTURE.md): shared math is in
    `etkd_kernels/_shared/` (its `__init__` and one module per op that needs one)."""
    assert not imports_into(backend, [p for p in BACKEND_PACKAGES if p != backend])
