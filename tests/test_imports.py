"""The package root loads its names lazily, and the layers and models load no trainer.

Each check imports in a fresh interpreter, since this test process has loaded everything already.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import xax

ROOT = Path(__file__).resolve().parents[1]

# What a project using only xax's layers or models must not pay for.
TRAINER = ("xax.task", "datasets", "orbax", "omegaconf", "tensorboardX", "pynvml")

LIGHT_MODULES = (
    "xax",
    "xax.nn",
    "xax.arch",
    *sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in (ROOT / "xax" / "arch").rglob("*.py")
        if path.name != "__init__.py"
    ),
    "xax.parallel",
    "xax.core.config",
    "xax.core.errors",
    "xax.core.state",
    "xax.core.metric",
    "xax.utils",
)

# Imports the modules one after another and reports, for each, the heavy ones it brought in first.
PROGRAM = """
import importlib, json, sys

heavy = sys.argv[1].split(",")
loaded = {}
for name in sys.argv[2:]:
    importlib.import_module(name)
    new = [h for h in heavy if any(m == h or m.startswith(h + ".") for m in sys.modules) and h not in loaded.values()]
    for h in new:
        loaded[h] = name
print(json.dumps(loaded))
"""


def _loaded_by(modules: tuple[str, ...]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))} | {"JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, ",".join(TRAINER), *modules],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_layers_and_models_load_no_trainer() -> None:
    loaded = _loaded_by(LIGHT_MODULES)
    assert not loaded, "; ".join(f"importing {module} loads {heavy}" for heavy, module in loaded.items())


def test_the_check_sees_a_trainer_import() -> None:
    loaded = _loaded_by(("xax.nn", "xax.task.task"))
    assert loaded.get("xax.task") == "xax.task.task"
    assert loaded.get("omegaconf") == "xax.task.task"


def test_every_exported_name_resolves() -> None:
    for name in xax.__all__:
        assert getattr(xax, name) is not None, name
    assert set(xax.__all__) <= set(dir(xax))
    assert xax.Task.__module__ == "xax.task.task"
    with pytest.raises(AttributeError, match="has no attribute 'Tsak'"):
        _ = xax.Tsak  # type: ignore[attr-defined]


def test_missing_is_omegaconf_marker() -> None:
    import omegaconf

    assert xax.MISSING == omegaconf.MISSING
