"""The package's shape, read from its source with ``ast`` (nothing is imported).

Every ``import`` of a klseg module counts, at the top of a file or inside a function
(relative imports resolved); only ``if TYPE_CHECKING:`` blocks are left out, since they never
run. The arrows point one way, down the layers

    base (errors, defaults, the package's ``__init__``) < core < io < engine < render
    < commands < cli (and ``__main__``)

with no cycle between modules, even inside one layer; no module is over 700 lines and no
function body over 120.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "klseg_cli"
LAYERS = ("base", "core", "io", "engine", "render", "commands", "cli")
MAX_MODULE_LINES = 700
MAX_BODY_LINES = 120


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """{dotted name: file} of every module of the package (a package by its ``__init__``)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = child.test if isinstance(child, ast.If) else None
            if isinstance(test, ast.Name | ast.Attribute) and "TYPE_CHECKING" in ast.unparse(test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module ``name`` imports (``from .x import f`` counts as
    module ``.x``; ``from . import x`` as module ``x`` when it is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in known else module)
    return {m for m in found if m in known and m != name}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    mods = modules(package)
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layer(module: str) -> int:
    """The rank of a module's layer: base 0 ... cli 6."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("errors", "defaults"):
        return 0
    if parts[1] == "__main__":
        return len(LAYERS) - 1
    return LAYERS.index(parts[1])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_has_a_layer():
    for name in modules():
        assert 0 <= layer(name) < len(LAYERS), name


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    upward = [
        f"{name} ({LAYERS[layer(name)]}) imports {dep} ({LAYERS[layer(dep)]})"
        for name, deps in sorted(import_graph().items())
        for dep in sorted(deps)
        if layer(dep) > layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_no_module_over_700_lines():
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not long, long


def test_no_function_body_over_120_lines():
    long = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.body[0].lineno + 1
                if n > MAX_BODY_LINES:
                    long[f"{name}.{node.name}"] = n
    assert not long, long


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path):
    """The checks can fail: a package whose core imports its cli, which imports core."""
    pkg = tmp_path / "klseg_cli"
    for sub in ("core", "cli"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from ..cli.b import g\n")
    (pkg / "cli" / "b.py").write_text("from ..core import a\n")
    (pkg / "cli" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from klseg_cli.core.a import f\n"
    )
    graph = import_graph(pkg)
    assert graph["klseg_cli.core.a"] == {"klseg_cli.cli.b"}
    assert graph["klseg_cli.cli.b"] == {"klseg_cli.core.a"}
    assert graph["klseg_cli.cli.c"] == set()
    assert find_cycle(graph) == ["klseg_cli.cli.b", "klseg_cli.core.a", "klseg_cli.cli.b"]
    assert layer("klseg_cli.core.a") < layer("klseg_cli.cli.b")
