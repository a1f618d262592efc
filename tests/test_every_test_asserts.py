"""Every test reaches an assertion: read from the tests' source, without running them.

A test counts as asserting when, on a path it always takes, it runs an ``assert`` statement, a
``pytest.raises`` / ``warns`` / ``fail``, a function named ``assert*`` or ``check*`` (``_`` prefixes
aside: ``np.testing.assert_allclose``, ``assert_parity``, ``_check_run``), or a helper of its own
module, or of a ``tests.*`` module it imports from, that does. An assertion only inside an ``if``
(one whose other branch has none) or a ``while`` may never run, and does not count; loops over
the test's data do. A skipped test asserts nothing either: the PyTorch parity tests may skip only
where the torch extra is not installed (off Python 3.11).
"""

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PREFIXES = ("assert", "check")
PYTEST_CHECKS = {"raises", "warns", "fail", "deprecated_call"}

Functions = dict[str, ast.FunctionDef | ast.AsyncFunctionDef]


def _functions(tree: ast.Module) -> Functions:
    found: Functions = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.setdefault(node.name, node)
    return found


def _helpers(tree: ast.Module) -> Functions:
    """The module's own functions, and those it imports by name from other ``tests.*`` modules."""
    helpers: Functions = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tests":
            path = ROOT.joinpath(*node.module.split(".")).with_suffix(".py")
            if path.is_file():
                imported = _functions(ast.parse(path.read_text()))
                helpers |= {
                    alias.asname or alias.name: imported[alias.name] for alias in node.names if alias.name in imported
                }
    return helpers | _functions(tree)


def _asserting_call(node: ast.AST, helpers: Functions, seen: set[str]) -> bool:
    """Whether this statement or expression calls something that asserts (nested functions aside)."""
    stack = [node]
    while stack:
        current = stack.pop()
        if current is not node and isinstance(current, ast.Lambda | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if isinstance(current, ast.IfExp):
            stack.append(current.test)
            continue
        if isinstance(current, ast.Call):
            func = current.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if name is not None:
                if name.lstrip("_").startswith(PREFIXES):
                    return True
                on_pytest = (
                    isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "pytest"
                )
                if on_pytest and name in PYTEST_CHECKS:
                    return True
                if name in helpers and name not in seen:
                    seen.add(name)
                    if _reaches_assertion(helpers[name].body, helpers, seen):
                        return True
        stack.extend(ast.iter_child_nodes(current))
    return False


def _reaches_assertion(body: list[ast.stmt], helpers: Functions, seen: set[str]) -> bool:
    """Whether running these statements in order certainly reaches an assertion."""
    for stmt in body:
        match stmt:
            case ast.Assert():
                return True
            case ast.FunctionDef() | ast.AsyncFunctionDef() | ast.ClassDef():
                continue
            case ast.If(test=test, body=then, orelse=orelse):
                if _asserting_call(test, helpers, seen):
                    return True
                if (
                    then
                    and orelse
                    and _reaches_assertion(then, helpers, seen)
                    and _reaches_assertion(orelse, helpers, seen)
                ):
                    return True
            case ast.While(test=test):
                if _asserting_call(test, helpers, seen):
                    return True
            case ast.For(iter=iterable, body=loop) | ast.AsyncFor(iter=iterable, body=loop):
                if _asserting_call(iterable, helpers, seen) or _reaches_assertion(loop, helpers, seen):
                    return True
            case ast.With(items=items, body=inner) | ast.AsyncWith(items=items, body=inner):
                if any(_asserting_call(item.context_expr, helpers, seen) for item in items):
                    return True
                if _reaches_assertion(inner, helpers, seen):
                    return True
            case ast.Try(body=inner, finalbody=final):
                if _reaches_assertion(inner, helpers, seen) or _reaches_assertion(final, helpers, seen):
                    return True
            case ast.Match():
                continue
            case _:
                if _asserting_call(stmt, helpers, seen):
                    return True
    return False


def _collected_tests(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """The functions pytest collects as tests: ``test*`` at module level and in ``Test*`` classes."""
    found = []
    for node in tree.body:
        members = node.body if isinstance(node, ast.ClassDef) and node.name.startswith("Test") else [node]
        found += [
            f for f in members if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) and f.name.startswith("test")
        ]
    return found


def find_tests_without_assertion(paths: list[Path]) -> list[str]:
    """``path:line: name`` of each test in these files that may end without asserting."""
    missing = []
    for path in paths:
        tree = ast.parse(path.read_text())
        helpers = _helpers(tree)
        for node in _collected_tests(tree):
            if not _reaches_assertion(node.body, helpers, {node.name}):
                shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                missing.append(f"{shown}:{node.lineno}: {node.name}")
    return missing


def test_every_test_reaches_an_assertion() -> None:
    paths = sorted(TESTS.rglob("test_*.py"))
    assert len(paths) > 50
    assert find_tests_without_assertion(paths) == []


def test_the_audit_finds_tests_that_may_not_assert(tmp_path: Path) -> None:
    source = tmp_path / "test_sample.py"
    source.write_text(
        "import numpy as np\n"
        "import pytest\n\n"
        "def helper(x):\n    assert x\n\n"
        "def quiet_helper(x):\n    return x\n\n"
        "def test_plain():\n    assert 1\n\n"
        "def test_numpy():\n    np.testing.assert_array_equal([1], [1])\n\n"
        "def test_raises():\n    with pytest.raises(ValueError):\n        int('x')\n\n"
        "def test_helper():\n    helper(1)\n\n"
        "def test_loop():\n    for x in [1, 2]:\n        assert x\n\n"
        "def test_both_branches(flag=True):\n    if flag:\n        assert 1\n    else:\n        assert 2\n\n"
        "def test_nothing():\n    quiet_helper(1)\n\n"
        "def test_only_if(rows=()):\n    for row in rows:\n        if row:\n            assert row\n\n"
        "def test_only_in_nested_function():\n    def inner():\n        assert 1\n"
    )
    found = [line.rsplit(": ", 1)[1] for line in find_tests_without_assertion([source])]
    assert found == ["test_nothing", "test_only_if", "test_only_in_nested_function"]


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the torch extra is installed on Python 3.11 only")
def test_the_torch_tests_run_where_torch_installs() -> None:
    # The PyTorch parity tests skip when torch is missing; on 3.11, where `make install` adds the
    # torch extra, a skip would hide them.
    assert importlib.util.find_spec("torch") is not None
    assert importlib.util.find_spec("transformers") is not None
