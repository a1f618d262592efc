"""The layer-statistics cost benchmark's CPU check (``--tiny``): both variants run and are reported."""

from pathlib import Path

import pytest

from benchmarks import layer_stats_cost
from tests.benchmarks.results import read_results


@pytest.mark.slow
def test_tiny_run_reports_both_variants(tmp_path: Path) -> None:
    layer_stats_cost.main(["--tiny", "--rounds", "1", "--out", str(tmp_path)])
    off, on = read_results(tmp_path, "layer_stats_cost_tiny")
    assert (off["layer_stats"], on["layer_stats"]) == ("off", "on")
    assert off["layers_scalars"] == 0 and on["layers_scalars"] > 0 and off["cost_percent"] == 0.0
