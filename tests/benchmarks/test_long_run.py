"""The long-run benchmark's CPU check (``--tiny``): both tasks train past every (scaled-down) cadence,
and the table holds each one's minute-by-minute rates and the ratio of the last minute to the first."""

from pathlib import Path

import pytest

from benchmarks import long_run
from tests.benchmarks.results import read_results


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_long_run_tiny(tmp_path: Path) -> None:
    long_run.main(["--tiny", "--out", str(tmp_path)])
    rows = read_results(tmp_path, "long_run_tiny")
    assert [row["task"] for row in rows] == ["regression", "mnist"]
    for row in rows:
        rates = [float(rate) for rate in row["steps_per_s_by_minute"].split(", ")]
        assert len(rates) >= 3 and rates[1] > 0
        assert row["minute_1_steps_per_s"] == pytest.approx(rates[1], abs=0.5)
        assert row["last_minute_steps_per_s"] == pytest.approx(rates[-1], abs=0.5)
        assert row["ratio_last_vs_minute_1"] == row["last_minute_steps_per_s"] / row["minute_1_steps_per_s"]
        # Every cadence fired more than once inside the run.
        assert row["validations"] >= 2 and row["windows_with_checkpoint"] >= 2, row
    regression, mnist = rows
    assert mnist["media_passes"] >= 2 and regression["media_passes"] == 0
