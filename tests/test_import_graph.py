"""No import cycle among xax's modules, lazy imports included, read from the source.

Every ``import`` counts: at module level, inside a function (an import deferred to call time still
ties the two modules together) and under ``if TYPE_CHECKING:`` (a module that names another in its
types depends on it). The one exception is the root package's ``TYPE_CHECKING`` block, which only
mirrors its lazily loaded exports for type checkers. ``from a.b import c`` points at the module
``a.b.c`` when there is one, else at ``a.b``.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "xax"

Graph = dict[str, set[str]]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, module: str) -> list[ast.Import | ast.ImportFrom]:
    """Every import in ``tree``; for the root package, none under ``if TYPE_CHECKING:``."""
    skipped: set[ast.AST] = set()
    if module == "xax":
        for node in tree.body:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                skipped.update(ast.walk(ast.Module(body=node.body, type_ignores=[])))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom) and node not in skipped]


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        source = ".".join([*base, *([node.module] if node.module else [])])
    else:
        source = node.module or ""
    targets = set()
    for alias in node.names:
        submodule = f"{source}.{alias.name}"
        if submodule in known:
            targets.add(submodule)
        elif source in known:
            targets.add(source)
    return targets


def import_graph() -> Graph:
    """Each xax module and the xax modules it imports."""
    paths = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    known = set(paths)
    graph: Graph = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        edges = set().union(*(_targets(node, module, is_package, known) for node in _imports(tree, module)))
        graph[module] = edges - {module}
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle (as a closed path) through each strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph: Graph, group: set[str]) -> list[str]:
    """A shortest closed path through the group's first module (breadth-first, inside the group)."""
    start = min(group)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & group):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


def test_graph_is_read() -> None:
    graph = import_graph()
    assert "xax.core.errors" in graph["xax.core.config"]  # module level
    assert "xax.core.config_io" in graph["xax.task.mixins.runnable"]  # a name from a module
    assert "xax.task.launchers" in graph["xax.task.mixins.runnable"]  # inside a function
    assert "xax.task.task" not in graph["xax"]  # the root's type-checking mirror


def test_cycle_finder_names_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]


def test_no_import_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (lazy imports included): " + "; ".join(" -> ".join(c) for c in cycles)
