"""The examples in xax's docstrings run and show what they print (``doctest``).

Every module of the package whose source has an ``Examples:`` section or a ``>>>`` prompt is
collected; a module listed here must have at least one example that runs.
"""

import doctest
import importlib
import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.find_spec("xax")
assert _SPEC is not None and _SPEC.submodule_search_locations is not None
ROOT = Path(next(iter(_SPEC.submodule_search_locations)))

# Modules whose public functions must keep their examples (a removed example fails this test).
MUST_HAVE_EXAMPLES = {
    "xax.core.metric",
    "xax.core.state",
    "xax.nn.attention",
    "xax.nn.distributions",
    "xax.nn.embeddings",
    "xax.nn.lora",
    "xax.nn.losses",
    "xax.nn.metrics",
    "xax.nn.mlp",
    "xax.nn.norms",
    "xax.nn.precision",
    "xax.arch.diffusion.embeddings",
    "xax.arch.diffusion.flow",
    "xax.arch.diffusion.gaussian",
    "xax.arch.diffusion.guidance",
    "xax.arch.diffusion.layers",
    "xax.arch.diffusion.samplers",
    "xax.arch.diffusion.schedules",
    "xax.utils.flops",
    "xax.utils.idx",
    "xax.utils.pytree",
    "xax.utils.text",
}


def modules_with_examples() -> list[str]:
    """Dotted names of the ``xax`` modules whose source has ``Examples:`` or ``>>>``."""
    names = []
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if ">>>" in text or "Examples:" in text:
            parts = path.relative_to(ROOT.parent).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = modules_with_examples()


def test_the_listed_modules_have_examples() -> None:
    missing = sorted(MUST_HAVE_EXAMPLES - set(MODULES))
    assert not missing, f"these modules lost their docstring examples: {missing}"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    tests = [test for test in doctest.DocTestFinder().find(module) if test.examples]
    assert tests, f"{name} has an Examples: section without a >>> example that doctest can run"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples in {name} failed:\n" + "".join(
        report
    )
