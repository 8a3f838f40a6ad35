"""The package's layering and import graph (architecture.md): read from the source, no imports.

Layers, lowest first: ``platform`` (pure torch: never Ray, MLflow or a higher layer),
``actors`` and ``tracking`` (each on platform only), ``launch`` (composes them), ``tuning``
and ``cluster``, then ``cli``. Imports under ``if TYPE_CHECKING:`` are annotations, not
dependencies, and are skipped; imports inside functions count (they still form cycles).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hfedmoe"

# What each part may import from hfedmoe (besides itself).
ALLOWED = {
    "platform": set(),
    "actors": {"platform"},
    "tracking": {"platform"},
    "launch": {"platform", "actors", "tracking"},
    "tuning": {"platform", "actors", "tracking", "launch"},
    "cluster": {"platform"},
    "cli": {"platform", "actors", "tracking", "launch", "tuning", "cluster"},
}
NEVER_IN_PLATFORM = {"ray", "mlflow"}
# Shared types and pure math: leaves of the platform (nothing of hfedmoe below them).
LEAVES = {"hfedmoe.platform.records", "hfedmoe.platform.errors", "hfedmoe.platform.selection"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path) -> set[str]:
    """Modules a file imports at run time (hfedmoe ones resolved to their module)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


GRAPH = {name: {m for m in imports(path) if m in MODULES} for name, path in MODULES.items()}


def part(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else module


def test_the_scan_sees_the_package():
    assert "hfedmoe.platform.engine" in MODULES and "hfedmoe.actors.executor" in MODULES
    assert "hfedmoe.platform.records" in GRAPH["hfedmoe.platform.engine"]


def test_platform_never_imports_ray_mlflow_or_a_higher_layer():
    def forbidden(imported: str) -> bool:
        if imported.split(".")[0] in NEVER_IN_PLATFORM:
            return True
        return imported.startswith("hfedmoe.") and part(imported) != "platform"

    bad = [
        (name, imported)
        for name, path in MODULES.items()
        if part(name) == "platform"
        for imported in imports(path)
        if forbidden(imported)
    ]
    assert bad == []


def test_no_layer_imports_a_higher_one():
    bad = [
        (name, imported)
        for name, targets in GRAPH.items()
        if part(name) in ALLOWED
        for imported in targets
        if part(imported) != part(name) and part(imported) not in ALLOWED[part(name)]
    ]
    assert bad == []


def test_leaf_modules_import_nothing_of_hfedmoe():
    assert {leaf: GRAPH[leaf] for leaf in LEAVES} == {leaf: set() for leaf in LEAVES}


def module_level_imports(path: Path) -> set[str]:
    """Modules a file imports when it is imported (top-level statements only)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def every_import(path: Path) -> set[str]:
    """Modules a file names in any import, type-checking ones included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update({node.module, *(f"{node.module}.{a.name}" for a in node.names)})
    return found


STRATEGIES = "hfedmoe.platform.strategies"


def test_config_validates_names_without_importing_the_strategies_at_module_level():
    config = MODULES["hfedmoe.platform.config"]
    assert not {m for m in module_level_imports(config) if m.startswith(STRATEGIES)}
    assert STRATEGIES in GRAPH["hfedmoe.platform.config"]  # inside its validators


def test_aggregation_never_names_the_strategies():
    imported = every_import(MODULES["hfedmoe.platform.aggregation"])
    assert not {m for m in imported if m.startswith(STRATEGIES)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module (or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_cycle_check_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    """Function-level imports count: a cycle through one still breaks at import time."""
    assert cycles(GRAPH) == []
