"""``xax.checkpoint`` on its own, without a Task: a model and its optimizer state saved, kept by
retention, verified by checksums and restored onto another mesh."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from xax.checkpoint import (
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointOptions,
    CorruptCheckpointError,
    abstract_like,
    checkpoint_steps,
    load_checkpoint,
    read_metadata,
    restore_latest,
    restore_weights,
)
from xax.checkpoint import checksums as checksums_module
from xax.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def make_tree(seed: int) -> dict:
    """A model's arrays and its Adam state after one update, different for every seed."""
    model = eqx.nn.MLP(4, 2, width_size=8, depth=1, key=jax.random.key(seed))
    params = eqx.filter(model, eqx.is_array)
    optimizer = optax.adam(1e-2)
    with jax.numpy_dtype_promotion("standard"):  # as the training step runs optax
        opt_state = optimizer.init(params)
        grads = jax.tree.map(jnp.ones_like, params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
    return {"params": eqx.apply_updates(params, updates), "opt_state": opt_state}


def assert_trees_equal(a: object, b: object) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def save_steps(directory: Path, steps: list[int], options: CheckpointOptions, **metrics: float) -> None:
    manager = CheckpointManager(directory, options)
    try:
        for step in steps:
            manager.save(step, make_tree(step), {"step": step}, metrics=metrics or None)
        manager.wait()
    finally:
        manager.close()


def test_save_retention_and_restore_of_a_plain_pytree(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    # Steps 8, 9, 10: kept by number, never as strings (where "9" sorts after "10").
    save_steps(directory, [1, 2, 8, 9, 10], CheckpointOptions(keep_last=2))
    assert checkpoint_steps(directory) == [9, 10]
    assert read_metadata(directory, 9) == {"step": 9}

    restored = restore_latest(directory, make_tree(0))
    assert restored is not None
    assert (restored.step, restored.path, restored.metadata) == (10, directory / "10", {"step": 10})
    assert_trees_equal(restored.tree, make_tree(10))
    assert jax.tree.structure(restored.tree) == jax.tree.structure(make_tree(0))

    older = restore_latest(directory, make_tree(0), before_step=10)
    assert older is not None and older.step == 9
    assert_trees_equal(older.tree, make_tree(9))
    assert restore_latest(directory, make_tree(0), before_step=9) is None

    model = eqx.nn.MLP(4, 2, width_size=8, depth=1, key=jax.random.key(99))
    assert_trees_equal(eqx.filter(restore_weights(model, directory, 10), eqx.is_array), make_tree(10)["params"])


def test_restore_onto_another_mesh(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    save_steps(directory, [3], CheckpointOptions())  # saved on one device
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    first_axis = NamedSharding(mesh, PartitionSpec("data"))

    def place(leaf: jax.Array) -> jax.Array:
        divisible = leaf.ndim > 0 and leaf.shape[0] % mesh.devices.size == 0
        return jax.device_put(leaf, first_axis if divisible else replicated)

    target = abstract_like(jax.tree.map(place, make_tree(0)))
    restored = restore_latest(directory, target)
    assert restored is not None
    assert_trees_equal(restored.tree, make_tree(3))
    weight = restored.tree["params"].layers[0].weight
    assert weight.sharding == first_axis and len(weight.addressable_shards) == mesh.devices.size


def test_keep_best_keeps_the_best_ranked_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    options = CheckpointOptions(keep_last=1, keep_best=1, best_metric="loss", best_mode="min")
    manager = CheckpointManager(directory, options)
    try:
        for step, loss in zip([10, 20, 30, 40], [3.0, 1.0, 2.0, 4.0], strict=True):
            manager.save(step, make_tree(step), {}, metrics={"loss": loss}, wait=True)
        manager.save(50, make_tree(50), {}, wait=True)  # not ranked: kept by keep_last only
    finally:
        manager.close()
    assert checkpoint_steps(directory) == [20, 50]


def test_checksums_are_verified_and_restore_falls_back_past_a_mismatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1, 2], CheckpointOptions(keep_last=2))
    recorded_path = directory / "2" / "checksums" / "metadata"
    recorded = json.loads(recorded_path.read_text())
    name = "params.layers.0.weight"
    assert recorded["algorithm"] == "xax-fmix32-sum-v1" and name in recorded["arrays"]
    recorded["arrays"][name] = "0" * 16
    recorded_path.write_text(json.dumps(recorded))

    with pytest.raises(CorruptCheckpointError, match=rf"array {name} does not match its checksum"):
        load_checkpoint(directory, 2, abstract_like(make_tree(0)))
    restored = restore_latest(directory, make_tree(0))
    assert restored is not None and restored.step == 1
    assert_trees_equal(restored.tree, make_tree(1))
    assert checkpoint_steps(directory) == [1]
    assert (directory / "corrupt" / "2").is_dir()
    assert f"fell back past {directory / '2'} (array {name} does not match its checksum)" in capsys.readouterr().err


def test_a_target_of_another_shape_is_named(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1], CheckpointOptions())
    wider = eqx.filter(eqx.nn.MLP(4, 2, width_size=16, depth=1, key=jax.random.key(0)), eqx.is_array)
    with pytest.raises(CheckpointMismatchError, match=r"parameter params\.layers\.0\.weight has shape \(16, 4\)"):
        restore_latest(directory, {"params": wider, "opt_state": make_tree(0)["opt_state"]})


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"checkpoint\.best_mode='lowest' is not one of \('min', 'max'\)"):
        CheckpointManager(Path("unused"), CheckpointOptions(best_mode="lowest"))
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_last=0 must be at least 1"):
        CheckpointManager(Path("unused"), CheckpointOptions(keep_last=0))
    options = CheckpointOptions()
    options.pinned_host = "yes"  # ty: ignore[invalid-assignment]  (as a config file could set it)
    with pytest.raises(ConfigError, match=r"checkpoint\.pinned_host='yes' must be true, false or null"):
        CheckpointManager(Path("unused"), options)


@pytest.mark.parametrize("pinned_host", [None, True, False])
def test_pinned_host_reaches_orbaxs_copy_off_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pinned_host: bool | None
) -> None:
    """The option is what orbax's device-to-host copy is asked for (None: orbax's default, pinned on GPUs
    only), and the checkpoint restores either way."""
    from orbax.checkpoint._src.serialization import replica_slices

    asked: list[bool] = []
    original = replica_slices.transfer_arrays_to_host

    def recording(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs["enable_pinned_host_transfer"])
        return original(*args, **kwargs)

    monkeypatch.setattr(replica_slices, "transfer_arrays_to_host", recording)
    manager = CheckpointManager(tmp_path / "checkpoints", CheckpointOptions(pinned_host=pinned_host))
    tree = make_tree(3)
    try:
        manager.save(1, tree, {"step": 1}, wait=True)
    finally:
        manager.close()
    assert asked and set(asked) == {jax.default_backend() == "gpu" if pinned_host is None else pinned_host}
    restored, _ = load_checkpoint(tmp_path / "checkpoints", 1, tree)
    assert_trees_equal(restored, tree)


def test_importing_it_loads_no_task() -> None:
    code = (
        "import sys, xax.checkpoint\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('xax.task') or m in ('datasets', 'omegaconf'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == ""


def test_prewarm_compiles_the_first_saves_checksums_ahead_and_writes_nothing_here(tmp_path: Path) -> None:
    """A prewarmed manager's first save uses the checksums compiled ahead (the jitted function compiles
    nothing more), records the same checksums as the jitted function, and leaves only its own step."""
    tree = {**make_tree(5), "extra": jnp.arange(7.0)}  # a layout no other save compiled for
    directory = tmp_path / "checkpoints"
    manager = CheckpointManager(directory, CheckpointOptions())
    try:
        manager.prewarm(tree)
        jitted: Any = checksums_module._checksums_fn  # its cache size is not in jax's type stubs
        compiled_before = jitted._cache_size()
        manager.save(4, tree, {"step": 4}, wait=True)
        assert jitted._cache_size() == compiled_before
    finally:
        manager.close()
    names, arrays = checksums_module._array_leaves(tree)
    expected = checksums_module.host_checksums(names, checksums_module._checksums_fn(arrays))
    recorded = json.loads((directory / "4" / "checksums" / "metadata").read_text())["arrays"]
    assert recorded == expected
    assert checkpoint_steps(directory) == [4]
    restored = restore_latest(directory, tree)
    assert restored is not None and restored.step == 4
    assert_trees_equal(restored.tree, tree)


def test_save_phases_account_for_the_blocking_time(tmp_path: Path) -> None:
    """``save_phases`` names where a save blocked: a wait on a slow previous write is the previous write's,
    not orbax's; the phases add up to no more than the call."""
    manager = CheckpointManager(tmp_path / "checkpoints", CheckpointOptions())
    try:
        manager.save(1, make_tree(1), {"step": 1})
        slow_write = threading.Event()
        orbax: Any = manager.orbax_manager()
        original_wait = orbax.wait_until_finished

        def wait_slowly() -> None:  # a previous write that is still running for 0.3 s
            if not slow_write.is_set():
                slow_write.set()
                time.sleep(0.3)
            original_wait()

        orbax.wait_until_finished = wait_slowly
        start = time.perf_counter()
        manager.save(2, make_tree(2), {"step": 2}, wait=True)
        elapsed = time.perf_counter() - start
        phases = manager.save_phases
    finally:
        manager.close()
    expected = {"prewarm_wait", "open", "previous_write_wait", "metadata", "orbax_save", "checksums_dispatch"}
    assert set(phases) == expected | {"write_wait"}
    assert phases["previous_write_wait"] >= 0.3 > max(phases["orbax_save"], phases["checksums_dispatch"])
    assert all(value >= 0 for value in phases.values())
    assert sum(phases.values()) <= elapsed
