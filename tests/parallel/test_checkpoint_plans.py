"""A checkpoint saved under one plan and device count restores under another with equal parameters."""

import json
from pathlib import Path

import jax
import numpy as np
from jax.sharding import PartitionSpec

from tests.parallel.eight_devices import start
from xax.checkpoint import load_arrays_anywhere, named_leaves
from xax.testing.plan_parity import TinyLM, TinyLMConfig
from xax.utils.pytree import path_name

COMMON = ["log.stdout=false", "log.tensorboard=false", "compile.cache=false", "valid_every_n_steps=null"]


def saved_params(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    device = jax.sharding.make_single_device_sharding(jax.devices()[0])
    tree = load_arrays_anywhere(run_dir / "checkpoints", step, device)
    return {name: np.asarray(value) for name, value in named_leaves(tree["params"]).items()}


def test_fsdp_on_eight_devices_and_one_device_restore_each_other(tmp_path: Path) -> None:
    one = tmp_path / "one"
    TinyLM.launch(
        TinyLMConfig(batch_size=8, max_steps=2),
        argv=["launcher.kind=single_device", f"artifacts.run_dir={one}", *COMMON],
    )
    out = tmp_path / "restored_on_eight.npz"
    proc = start("checkpoint", str(one / "checkpoints" / "2"), str(tmp_path / "r8"), str(tmp_path / "s8"), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]

    # One device -> eight under fsdp: equal parameters, and really sharded there.
    expected = saved_params(one, 2)
    with np.load(out) as restored:
        assert sorted(restored.files) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(restored[name], value, err_msg=name)
    specs = json.loads(out.with_suffix(".json").read_text())
    assert specs["layers.self_attn.q_proj.weight"] == str(PartitionSpec(None, None, "fsdp"))

    # Eight devices under fsdp -> one device.
    runs: list[TinyLM] = []

    class Restoring(TinyLM):
        def on_run_end(self) -> None:
            super().on_run_end()
            runs.append(self)

    Restoring.launch(
        TinyLMConfig(batch_size=8, max_steps=2),
        argv=[
            "launcher.kind=single_device",
            f"artifacts.run_dir={tmp_path / 'r1'}",
            f"resume={tmp_path / 's8'}",
            *COMMON,
        ],
    )
    ts = runs[0].final_train_state
    assert ts is not None
    saved = saved_params(tmp_path / "s8", 2)
    leaves = jax.tree_util.tree_leaves_with_path(ts.params)
    assert len(leaves) == len(saved)
    for path, leaf in leaves:
        assert leaf.sharding.num_devices == 1
        np.testing.assert_array_equal(np.asarray(leaf), saved[path_name(path)], err_msg=path_name(path))
