"""The package's import graph, read from the source: no cycles (counting imports inside functions,
not those under `if TYPE_CHECKING:`), and no module imports another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "hsae"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """(module, names) of every import statement, skipping TYPE_CHECKING blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, [alias.name for alias in node.names]
        stack.extend(ast.iter_child_nodes(node))


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    private: list[str] = []
    for name, path in MODULES.items():
        for module, names in _imports(ast.parse(path.read_text())):
            if module != "hsae" and not module.startswith("hsae."):
                continue
            for imported in names or [None]:
                target = f"{module}.{imported}" if imported and f"{module}.{imported}" in MODULES else module
                if target in MODULES and target != name:
                    edges[name].add(target)
                dunder = imported is not None and imported.startswith("__") and imported.endswith("__")
                if imported and imported.startswith("_") and not dunder and target == module and module != name:
                    private.append(f"{name} imports {module}.{imported}")
            if module.rsplit(".", 1)[-1].startswith("_") and module not in ("hsae.__main__",):
                private.append(f"{name} imports the private module {module}")
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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

    for v in edges:
        if v not in index:
            visit(v)
    return found


def _is_package_init(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def test_no_import_cycles():
    edges, _ = _graph()
    # A submodule importing its own package counts: e.g. hsae.models.base -> hsae -> hsae.models -> base.
    cycles = _cycles(edges)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_across_modules():
    _, private = _graph()
    # The CLI's shared helpers module is private to the cli package by design (not a command).
    private = [p for p in private if not (p.startswith("hsae.cli.") and "hsae.cli._common" in p)]
    assert not private, "\n".join(private)


def test_graph_sees_the_package():
    edges, _ = _graph()
    assert "hsae.models.base" in edges and "hsae.train" in edges
    assert "hsae.models.base" in edges["hsae.train"]
    assert not any(_is_package_init(n) for n in ("hsae.train", "hsae.models.base"))
