"""The first-windows benchmark: its window rates from a log, and its CPU check runs both settings
(the import in the background, and at the first record) in fresh processes."""

import json
import math
from pathlib import Path

import pytest

from benchmarks import first_windows
from tests.benchmarks.results import read_results


def test_window_rates_are_steps_over_time_between_records(tmp_path: Path) -> None:
    records = [(10, 1.0), (20, 3.0), (40, 4.0)]
    lines = [
        json.dumps({"phase": "train", "step": step, "elapsed_time_s": elapsed, "scalars": {}})
        for step, elapsed in records
    ]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    assert first_windows.window_rates(tmp_path) == [(20, 5.0), (40, 20.0)]


@pytest.mark.slow
def test_first_windows_tiny(tmp_path: Path) -> None:
    first_windows.main(["--tiny", "--steps", "100", "--every", "20", "--out", str(tmp_path)])
    rows = {row["tensorboardX import"]: row for row in read_results(tmp_path, "first_windows_tiny")}
    assert set(rows) == set(first_windows.SETTINGS)
    for row in rows.values():
        assert row["settled_steps_per_s"] > 0
        ratios = [row[f"{label}_window_over_settled"] for label in ("first", "second", "third", "fourth")]
        assert all(math.isfinite(ratio) and ratio > 0 for ratio in ratios), row
