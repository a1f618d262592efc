"""``parallel.init_on_host``: on a GPU or TPU the jitted initialization runs on the host's CPU and each
device receives its shards. Here the host path is forced on simulated CPU devices (``host_cpu`` patched),
and gives the device path's state bitwise, laid out by the same shardings."""

from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
import pytest

from xax.task.mixins import train_setup
from xax.testing.plan_parity import TinyLM, TinyLMConfig


class _InitializedError(Exception):
    pass


class CapturingLM(TinyLM):
    captured: ClassVar[dict[str, Any]] = {}

    def init_train_state(self, optimizer: Any) -> Any:
        state, _ = super().init_train_state(optimizer)
        CapturingLM.captured["state"] = state
        raise _InitializedError


def _init(run_dir: Path, *overrides: str) -> Any:
    with pytest.raises(_InitializedError):
        CapturingLM.launch(
            TinyLMConfig(batch_size=8, max_steps=1),
            argv=[
                "launcher.kind=multi_device",
                "launcher.num_devices=4",
                "parallel.plan=fsdp",
                f"artifacts.run_dir={run_dir}",
                "log.stdout=false",
                "log.tensorboard=false",
                "compile.cache=false",
                "ema.decay=0.9",
                *overrides,
            ],
        )
    return CapturingLM.captured.pop("state")


def test_host_init_equals_device_init_with_the_same_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert jax.device_count() >= 4
    on_devices = _init(tmp_path / "device", "parallel.init_on_host=false")

    placed: list[tuple[int, ...]] = []
    place = train_setup.place_from_host

    def counting_place(array: jax.Array, sharding: Any) -> jax.Array:
        placed.append(array.shape)
        return place(array, sharding)

    monkeypatch.setattr(train_setup, "host_cpu", lambda: jax.local_devices(backend="cpu")[0])
    monkeypatch.setattr(train_setup, "place_from_host", counting_place)
    on_host = _init(tmp_path / "host")

    host_leaves, host_tree = jax.tree.flatten(on_host)
    device_leaves, device_tree = jax.tree.flatten(on_devices)
    assert host_tree == device_tree
    assert len(placed) == len(host_leaves)  # every leaf went through the host path
    sharded = 0
    for host, device in zip(host_leaves, device_leaves, strict=True):
        assert host.dtype == device.dtype and host.shape == device.shape
        np.testing.assert_array_equal(np.asarray(host), np.asarray(device))
        assert host.sharding.is_equivalent_to(device.sharding, host.ndim)
        sharded += not host.sharding.is_fully_replicated
        # Each device holds only its own shard.
        for shard in host.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(device)[shard.index])
    assert sharded > 0  # fsdp split some arrays, so the shards were really cut


def test_host_cpu_is_none_on_a_cpu_run() -> None:
    assert jax.default_backend() == "cpu"
    assert train_setup.host_cpu() is None
