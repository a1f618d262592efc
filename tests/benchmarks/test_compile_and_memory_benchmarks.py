"""The compile-time and remat-memory benchmarks' CPU checks (``--tiny``), and the suite's entry point."""

import json
from pathlib import Path

import pytest

from benchmarks import compile_time, remat_memory
from benchmarks.__main__ import main as suite_main


@pytest.mark.slow  # a whole benchmark run (--tiny): with the long runs
def test_second_launch_loads_from_the_persistent_cache(tmp_path: Path) -> None:
    compile_time.main(["--tiny", "--out", str(tmp_path)])
    cold, warm = json.loads((tmp_path / "compile_time_tiny.json").read_text())["results"]
    # Compiling even the tiny model takes several times longer than loading it from the cache.
    assert warm["first_step_s"] < cold["first_step_s"]
    assert warm["speedup"] == cold["first_step_s"] / warm["first_step_s"]


@pytest.mark.slow  # a whole benchmark run (--tiny): with the long runs
def test_remat_recomputes_the_forward_pass(tmp_path: Path) -> None:
    remat_memory.main(["--tiny", "--policies", "none,full", "--steps", "2", "--out", str(tmp_path)])
    none, full = json.loads((tmp_path / "remat_memory_tiny.json").read_text())["results"]
    assert (none["remat"], full["remat"]) == ("none", "full")
    # The recomputed blocks are counted in the step's FLOPs; their memory saving is a GPU measurement.
    assert full["tflop_per_step"] > none["tflop_per_step"]
    assert none["temp_gb (XLA)"] > 0


def test_suite_writes_combined_results(tmp_path: Path) -> None:
    suite_main(["--tiny", "--only", "checkpoint_save", "--out", str(tmp_path)])
    combined = json.loads((tmp_path / "results.json").read_text())
    (run,) = combined["benchmarks"]
    assert run["name"] == "checkpoint_save" and run["status"] == "ok" and run["results"]
    assert run["results"][0]["save"] == 1
    text = (tmp_path / "results.md").read_text()
    assert "| checkpoint_save | ok |" in text and "## checkpoint_save_tiny" in text


def test_suite_rejects_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="names \\['nope'\\]; choose from mnist_overhead"):
        suite_main(["--only", "nope", "--out", str(tmp_path)])
