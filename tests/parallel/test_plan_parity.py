"""The same tiny transformer, trained through the Task loop, gives the per-step loss and gradient
norm of one device under every plan and device count (1e-5 relative, float32)."""

import json
from pathlib import Path

import jax
import pytest

from tests.parallel.eight_devices import start
from xax.testing.plan_parity import PlanCase, run_parity

RTOL = 1e-5


def test_plans_on_two_and_four_devices_match_one_device(tmp_path: Path) -> None:
    assert jax.device_count() >= 4
    cases = [
        PlanCase(2, "dp"),
        # Whole batches placed by place_batch, rather than indices into resident data.
        PlanCase(4, "fsdp", ("data.device_resident_max_mb=0",)),
        PlanCase(4, "tp"),
    ]
    # Eager initialization: its small programs compile once for all runs (the 8-device test covers
    # the sharded, jitted one).
    overrides = ["parallel.sharded_init=false"]
    base, differences = run_parity(PlanCase(1, "dp"), cases, tmp_path, steps=3, rtol=RTOL, overrides=overrides)
    assert len(base.loss) == 3 and len(differences) == 3
    assert base.loss[0] != base.loss[-1]  # the weights change, so the comparison is not of constants


@pytest.mark.slow  # about 30 s; the 2- and 4-device parity above stays in the default suite
def test_all_three_axes_on_eight_devices_match_one_device(tmp_path: Path) -> None:
    out = tmp_path / "parity.json"
    proc = start("parity", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (values,) = result["differences"].values()
    assert set(values) == {"loss", "grad_norm", "valid_loss"}
    assert all(value <= RTOL for value in values.values()), values
