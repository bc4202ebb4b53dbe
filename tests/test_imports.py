"""Import directions, read from the source with `ast` (nothing is imported): ports know nothing of the methods,
precise_jax.data knows nothing of the methods, and no modules import each other in a cycle at module level.

Imports inside functions count for the directions (they run sooner or later) but not for cycles (they run after
every module has loaded). Each check is also run on a synthetic source that breaks it, so it cannot pass vacuously.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ports", "precise_jax")
# The only precise_jax modules outside precise_jax.data that precise_jax.data may use: low level, no methods.
DATA_MAY_USE = ("precise_jax.assets", "precise_jax.outputs", "precise_jax.sites")


def tree_sources() -> dict[str, tuple[str, bool]]:
    """Module name -> (source, is a package) for every module of PACKAGES."""
    sources = {}
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            parts = list(file.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            sources[name] = (file.read_text(encoding="utf-8"), is_package)
    return sources


def _import_nodes(tree: ast.Module, module_level: bool) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, or only those that run when the module loads (not in functions or TYPE_CHECKING)."""
    if not module_level:
        return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.With, ast.For, ast.While)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(tree.body)
    return found


def imports_of(name: str, source: str, is_package: bool, modules: set[str], module_level: bool) -> set[str]:
    """The modules of `modules` that module `name` imports: `from a import b` counts as a.b when that is a module,
    else as a (the package's __init__ runs to give b)."""
    out = set()
    for node in _import_nodes(ast.parse(source), module_level):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for alias in node.names:
            out.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
    return {m for m in out if m in modules and m != name}


def import_graph(sources: dict[str, tuple[str, bool]], module_level: bool) -> dict[str, set[str]]:
    modules = set(sources)
    return {name: imports_of(name, src, pkg, modules, module_level) for name, (src, pkg) in sources.items()}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def direction_violations(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every forbidden import: ports -> precise_jax; precise_jax.data -> a methods module (directly or
    through the modules it uses)."""
    bad = []
    for name, targets in sorted(graph.items()):
        if _within(name, "ports"):
            bad += [f"{name} -> {t}" for t in sorted(targets) if _within(t, "precise_jax")]
        if _within(name, "precise_jax.data"):
            bad += [f"{name} -> {t} (reached)" for t in sorted(reachable(graph, name))
                    if _within(t, "precise_jax") and not _within(t, "precise_jax.data") and t not in DATA_MAY_USE]
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
            connect(v)
    return found


@pytest.fixture(scope="module")
def sources():
    found = tree_sources()
    assert {"ports", "ports.pretrained", "precise_jax", "precise_jax.data", "precise_jax.outputs"} <= set(found)
    return found


def test_import_directions(sources):
    assert direction_violations(import_graph(sources, module_level=False)) == []


def test_no_import_cycles_at_module_level(sources):
    assert cycles(import_graph(sources, module_level=True)) == []


@pytest.mark.parametrize("code", [
    "from precise_jax import capture\n",
    "import precise_jax.neurons\n",
    "def load():\n    from precise_jax.distributed import param_sharding\n",
])
def test_a_port_importing_precise_jax_is_caught(sources, code):
    broken = dict(sources, **{"ports.synthetic": (code, False)})
    assert any(v.startswith("ports.synthetic -> precise_jax") for v in
               direction_violations(import_graph(broken, module_level=False)))


def test_data_reaching_a_method_is_caught(sources):
    # Through a low-level module, so only the transitive check sees it.
    outputs, _ = sources["precise_jax.outputs"]
    broken = dict(sources, **{"precise_jax.outputs": (outputs + "\nfrom precise_jax.report import Report\n", False)})
    assert "precise_jax.data.examples -> precise_jax.report (reached)" in direction_violations(
        import_graph(broken, module_level=False))


def test_a_cycle_is_caught(sources):
    broken = dict(sources, **{"ports.errors": ("from ports.layers import Site\n", False)})
    found = cycles(import_graph(broken, module_level=True))
    assert any({"ports.errors", "ports.layers"} <= set(c) for c in found)
    function_level = dict(sources, **{"ports.errors": ("def f():\n    from ports.layers import Site\n", False)})
    assert cycles(import_graph(function_level, module_level=True)) == []
