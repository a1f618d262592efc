"""The MNIST overhead benchmark's CPU check (``--tiny``): it runs end to end and writes a table whose
ratios are those of its rates."""

from pathlib import Path

import pytest

from benchmarks import mnist_overhead
from tests.benchmarks.results import read_results


@pytest.mark.slow  # a whole benchmark run (--tiny): with the long runs
def test_mnist_overhead_tiny(tmp_path: Path) -> None:
    mnist_overhead.main(["--tiny", "--out", str(tmp_path)])
    rows = read_results(tmp_path, "mnist_overhead_tiny")
    assert [row["loop"] for row in rows] == ["hand_written_device_data", "hand_written_host_data", "xax"]
    reference = rows[0]["steps_per_s (best)"]
    assert all(row["ratio_vs_hand_written_device_data"] == row["steps_per_s (best)"] / reference for row in rows)
