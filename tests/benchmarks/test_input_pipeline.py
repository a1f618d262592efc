"""The input-pipeline benchmark's CPU check (``--tiny``): it runs end to end and writes a table whose
ratio is that of its rates."""

from pathlib import Path

import pytest

from benchmarks import input_pipeline
from tests.benchmarks.results import read_results


@pytest.mark.slow  # a whole benchmark run (--tiny): with the long runs
def test_input_pipeline_tiny(tmp_path: Path) -> None:
    input_pipeline.main(["--tiny", "--out", str(tmp_path)])
    rows = {row["measure"]: row["value"] for row in read_results(tmp_path, "input_pipeline_tiny")}
    loader, steps = rows["loader batches/s (prefetch path)"], rows["train steps/s (prefetch path)"]
    assert loader > 0 and steps > 0
    assert rows["loader / step rate"] == loader / steps
    waits = [value for measure, value in rows.items() if measure.startswith("data_wait_fraction")]
    assert len(waits) == 3 and all(0.0 <= wait < 1.0 for wait in waits)
