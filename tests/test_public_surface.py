"""Examples and benchmarks use xax only through its public modules, by names those re-export.

Read from the source: every ``from xax... import name`` in ``examples/`` and ``benchmarks/`` names a
public module and a name it re-exports explicitly (``from .x import Name as Name``, or the root's
lazy table); no code reaches into ``xax.task``, ``xax.core`` or ``xax.utils`` by attribute either.
"""

import ast
from pathlib import Path

import xax

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = (
    "xax",
    "xax.nn",
    "xax.arch",
    "xax.arch.diffusion",
    "xax.data",
    "xax.checkpoint",
    "xax.parallel",
    "xax.testing",
    "xax.interop",
)


def _exported(module: str) -> set[str]:
    """The names ``module``'s ``__init__.py`` re-exports explicitly (for the root: its lazy table)."""
    if module == "xax":
        return set(xax.__all__)
    init = ROOT.joinpath(*module.split("."), "__init__.py")
    tree = ast.parse(init.read_text(encoding="utf-8"))
    names = {
        alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.asname == alias.name
    }
    names |= {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    return names


def violations(path: Path) -> list[str]:
    """Each import or attribute in ``path`` that goes past xax's public surface, as ``file:line: what``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "xax":
            if node.module not in PUBLIC:
                found.append(f"{where}:{node.lineno}: from {node.module} import (not a public module)")
                continue
            exported = _exported(node.module)
            for alias in node.names:
                if alias.name not in exported:
                    found.append(f"{where}:{node.lineno}: {node.module} does not re-export {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "xax" and alias.name not in PUBLIC:
                    found.append(f"{where}:{node.lineno}: import {alias.name} (not a public module)")
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "xax"
            and (node.attr.startswith("_") or node.attr in ("task", "core", "utils"))
        ):
            found.append(f"{where}:{node.lineno}: xax.{node.attr}")
    return found


def test_examples_and_benchmarks_use_public_names() -> None:
    paths = sorted([*ROOT.joinpath("examples").rglob("*.py"), *ROOT.joinpath("benchmarks").rglob("*.py")])
    assert len(paths) > 10
    found = [line for path in paths for line in violations(path)]
    assert not found, "\n".join(found)


def test_a_private_import_is_caught(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text(
        "import xax\nfrom xax.task.mixins.logger import LogOptions\nfrom xax.nn import not_a_name\nx = xax.core\n",
        encoding="utf-8",
    )
    found = violations(source)
    assert found == [
        "probe.py:2: from xax.task.mixins.logger import (not a public module)",
        "probe.py:3: xax.nn does not re-export not_a_name",
        "probe.py:4: xax.core",
    ]
