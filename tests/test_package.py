"""The distribution as a user installs it: the wheel built from this checkout and its metadata."""

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path

import pytest

import xax

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Builds the wheel from a copy of the sources (the checkout gets no build folders)."""
    source = tmp_path_factory.mktemp("source")
    shutil.copytree(ROOT / "xax", source / "xax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    program = f"import setuptools.build_meta as backend; print(backend.build_wheel({str(out)!r}))"
    result = subprocess.run([sys.executable, "-c", program], cwd=source, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return out / result.stdout.strip().splitlines()[-1]


def _metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        name = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        return Parser().parsestr(archive.read(name).decode("utf-8"))


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_wheel_ships_types_license_and_version(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "xax/py.typed" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    metadata = _metadata(wheel)
    assert metadata["Version"] == xax.__version__ == "0.5.0"
    assert metadata["License-Expression"] == "MIT"
    classifiers = metadata.get_all("Classifier") or []
    for version in ("3.11", "3.12"):
        assert f"Programming Language :: Python :: {version}" in classifiers
    assert "Typing :: Typed" in classifiers
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL") or [])
    assert set(urls) >= {"Homepage", "Repository", "Issues"}
    extras = set(metadata.get_all("Provides-Extra") or [])
    assert extras >= {"wandb", "grain", "cuda", "tpu", "tensorboard", "all"}


def test_installed_version_matches() -> None:
    # The editable install's metadata, as `pip show xax` reports it.
    assert importlib.metadata.version("xax") == xax.__version__


def _module_level_imports(path: Path) -> set[str]:
    """Top-level packages imported when the module is imported (not inside functions or TYPE_CHECKING)."""
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def test_every_direct_import_is_a_declared_dependency(wheel: Path) -> None:
    declared = {
        _normalize(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0])
        for requirement in _metadata(wheel).get_all("Requires-Dist") or []
        if "extra ==" not in requirement
    }
    distributions = importlib.metadata.packages_distributions()
    missing: dict[str, str] = {}
    for path in sorted((ROOT / "xax").rglob("*.py")):
        for module in _module_level_imports(path):
            if module in sys.stdlib_module_names or module == "xax":
                continue
            names = {_normalize(name) for name in distributions.get(module, [module])}
            if not names & declared:
                missing[module] = str(path.relative_to(ROOT))
    assert not missing, f"imported at module level but not in [project] dependencies: {missing}"
