"""The parallel GPU benchmark's tiny mode runs end to end on 2 simulated CPU devices and writes its tables."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_mode_writes_every_measurement(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    command = [sys.executable, "-m", "benchmarks.parallel_gpu", "--tiny", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "parallel_gpu_tiny.json").read_text())
    assert results["environment"]["versions"]["jax"]
    rows = {(row["measure"], row["setting"]): row for row in results["results"]}
    # Every child ran: parity rows per plan within tolerance, both throughputs, both memories.
    for plan in ("dp", "fsdp", "tp"):
        assert rows[("parity (max rel diff)", f"{plan} on 2 devices")]["met"] == "yes"
    assert "tokens/s" in rows[("GPT-2 throughput", "dp, 2 GPU(s)")]["value"]
    assert rows[("dp scaling", "2 GPUs / 1 GPU")]["value"].endswith("x")
    raw = json.loads((tmp_path / "parallel_gpu_tiny_raw.json").read_text())
    dp, fsdp = raw["dp2"]["state_bytes_per_device"], raw["fsdp2"]["state_bytes_per_device"]
    # fsdp halves what each device holds of the (evenly divisible) weights and optimizer state.
    assert fsdp["params"] < 0.6 * dp["params"] and fsdp["opt_state"] < 0.6 * dp["opt_state"]
    assert raw["fsdp2"]["flops_per_step"] > 0
    assert (tmp_path / "parallel_gpu_tiny.md").read_text().startswith("# parallel_gpu_tiny")
