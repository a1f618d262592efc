"""The documentation stays true: every ```python block of every docs/*.md page runs, and every page is
in the site's navigation.

A page's blocks run in order in one namespace, as ``__main__``, in a fresh process whose working
directory is a temporary folder (what a reader gets by pasting them into one script). The code is
compiled under the page's own path at its own line numbers, so a failure points at the line of the
page. Blocks shown but not run are fenced as ``py`` (Python that needs a network or a cluster),
``text``, ``bash`` or ``yaml``. A page that trains for
longer than a few seconds says ``<!-- docs-test: slow -->`` and runs with the slow tests.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SLOW_MARK = "<!-- docs-test: slow -->"
FENCE = re.compile(
    r"^(?P<indent> *)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.MULTILINE | re.DOTALL
)

# Runs the assembled page: argv[1] is the source, argv[2] the page path the code is compiled under.
RUNNER = """
import sys
def _run_page(source_path, page):
    main = sys.modules["__main__"]
    main.__file__, sys.argv = page, [page]
    with open(source_path, encoding="utf-8") as file:
        code = compile(file.read(), page, "exec")
    exec(code, main.__dict__)
_run_page(sys.argv[1], sys.argv[2])
"""


def python_source(text: str) -> str:
    """The page's ```python blocks, each at its own line numbers, every other line left blank."""
    lines = [""] * (text.count("\n") + 1)
    for match in FENCE.finditer(text):
        if match.group("info").strip().split(" ")[0] != "python":
            continue
        first = text.count("\n", 0, match.start("body"))
        indent = len(match.group("indent"))
        for offset, line in enumerate(match.group("body").splitlines()):
            lines[first + offset] = line[indent:] if line[:indent].strip() == "" else line
    return "\n".join(lines)


def run_page(page: Path, workdir: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Runs a page's python blocks in a fresh process in ``workdir``, offline."""
    source = workdir.parent / f"{workdir.name}.py"
    source.write_text(python_source(page.read_text(encoding="utf-8")), encoding="utf-8")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(workdir.parent / "hf_home"),
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.run(
        [sys.executable, "-c", RUNNER, str(source), str(page)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def _runnable_pages() -> list:
    params = []
    for page in _pages():
        text = page.read_text(encoding="utf-8")
        if python_source(text).strip():
            marks = [pytest.mark.slow] if SLOW_MARK in text else []
            params.append(pytest.param(page, id=page.stem, marks=marks))
    return params


@pytest.mark.parametrize("page", _runnable_pages())
def test_page_runs(page: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = run_page(page, workdir)
    assert result.returncode == 0, f"{page.relative_to(ROOT)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def _nav_files(entries: list) -> list[str]:
    files = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        files.extend(_nav_files(value) if isinstance(value, list) else [value])
    return files


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_files(config["nav"])
    pages = [page.name for page in _pages()]
    assert sorted(set(pages) - set(nav)) == [], "pages missing from mkdocs.yml's nav"
    assert sorted(set(nav) - set(pages)) == [], "mkdocs.yml's nav names pages that do not exist"


def test_a_failing_block_names_its_page_and_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n```python\nvalue = 41\n```\n\nText, then a shell block that is not run:\n\n"
        "```bash\nexit 1\n```\n\n```python\nvalue += 1\nassert value == 43, value\n```\n",
        encoding="utf-8",
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = run_page(page, workdir, timeout=60)
    assert result.returncode == 1
    assert f'File "{page}", line 15' in result.stderr
    assert "AssertionError: 42" in result.stderr
