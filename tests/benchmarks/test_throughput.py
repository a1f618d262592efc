"""The three-way throughput benchmarks (GPT-2, DiT) run end to end in their tiny CPU modes: each of
xax's loop, the hand-written JAX loop and the PyTorch loop runs in its own process and is reported."""

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from benchmarks import dit_throughput, gpt2_throughput
from tests.benchmarks.results import read_results


@pytest.mark.slow
@pytest.mark.parametrize(
    ("main", "name", "rate"),
    [
        (gpt2_throughput.main, "gpt2_throughput_tiny", "tokens_per_s"),
        (dit_throughput.main, "dit_throughput_tiny", "images_per_s"),
    ],
)
def test_tiny_mode_runs_all_three_loops(
    tmp_path: Path, main: Callable[[Sequence[str]], None], name: str, rate: str
) -> None:
    main(["--tiny", "--out", str(tmp_path)])
    rows = {row["loop"]: row for row in read_results(tmp_path, name)}
    assert sorted(rows) == ["jax", "torch", "xax"]
    for row in rows.values():
        assert row[rate] > 0 and math.isclose(row["step_ms"], 1000.0 * _units_per_step(name) / row[rate])
    assert rows["xax"]["xax_over_this"] == 1.0
    assert math.isclose(rows["torch"]["xax_over_this"], rows["xax"][rate] / rows["torch"][rate])


def _units_per_step(name: str) -> int:
    """Tokens (GPT-2) or images (DiT) per step of the tiny setups."""
    if name.startswith("gpt2"):
        setup = gpt2_throughput.make_setup(True, "auto")
        return setup.batch * setup.model.max_seq_len
    return dit_throughput.make_setup(True, "auto").batch
