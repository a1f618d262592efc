"""The Shakespeare overhead benchmark's CPU check (``--tiny``): it runs end to end and writes a table
whose ratios are those of its rates."""

import math
from pathlib import Path

import pytest

from benchmarks import shakespeare_overhead
from tests.benchmarks.results import read_results


@pytest.mark.slow  # a whole benchmark run (--tiny): with the long runs
def test_shakespeare_overhead_tiny(tmp_path: Path) -> None:
    shakespeare_overhead.main(["--tiny", "--out", str(tmp_path)])
    hand, every_100, every_step = read_results(tmp_path, "shakespeare_overhead_tiny")
    assert [row["loop"] for row in (hand, every_100, every_step)] == [
        "hand_written",
        "xax (log every 100)",
        "xax (log every step)",
    ]
    assert all(row["steps_per_s"] > 0 and math.isfinite(row["steps_per_s"]) for row in (hand, every_100, every_step))
    assert every_100["ratio"] == every_100["steps_per_s"] / hand["steps_per_s"]
    assert every_step["ratio"] == every_step["steps_per_s"] / every_100["steps_per_s"]
