"""The GPT-2 ablation's CPU check (``--tiny``) and the kernel breakdown it relies on."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from benchmarks import gpt2_ablation
from benchmarks.profile_tools import aggregate_trace, format_breakdown, kernel_breakdown
from tests.benchmarks.results import read_results


@pytest.mark.slow  # a whole benchmark run (--tiny): with the long runs
def test_gpt2_ablation_tiny(tmp_path: Path) -> None:
    gpt2_ablation.main(
        ["--tiny", "--which", "base,projected,reference", "--profile-steps", "0", "--out", str(tmp_path)]
    )
    base, projected, reference = read_results(tmp_path, "gpt2_ablation_tiny")
    assert [base["variant"], projected["variant"], reference["variant"]] == ["base", "projected", "reference"]
    assert all(row["tokens_per_s"] > 0 and math.isfinite(row["step_ms"]) for row in (base, projected, reference))
    assert base["speed_over_base"] == 1.0
    # rate / base_rate and base_ms / ms differ only by float rounding.
    assert math.isclose(projected["speed_over_base"], base["step_ms"] / projected["step_ms"], rel_tol=1e-12)


def test_kernel_breakdown_counts_every_call(tmp_path: Path) -> None:
    step = jax.jit(lambda x: jnp.tanh(x @ x))
    x = jnp.ones((64, 64))
    step(x).block_until_ready()
    # The CPU client's events live on the host plane; GPU kernels on "/device:" planes.
    rows = kernel_breakdown(step, x, steps=3)
    assert all(row.plane.startswith("/device:") for row in rows)
    counts = {}
    for calls in (3, 6):
        folder = tmp_path / str(calls)
        with jax.profiler.trace(str(folder)):
            for _ in range(calls):
                y = step(x)
            y.block_until_ready()
        (trace,) = folder.rglob("*.xplane.pb")
        host = aggregate_trace(trace, "/host:CPU")
        counts[calls] = sum(row.count for row in host if "PjitFunction" in row.name)
        assert host == sorted(host, key=lambda row: -row.total_ms)  # heaviest first
    assert counts[3] > 0 and counts[6] == 2 * counts[3]  # every call is counted
    table = format_breakdown(host, steps=6, top=5)
    assert "| ms/step | calls/step | name |" in table and "PjitFunction" in table
