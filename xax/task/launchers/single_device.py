"""Runs on the first local device."""

import jax
from jax.sharding import Mesh
from typing_extensions import override

from xax.task.launchers.base import Launcher, data_mesh


class SingleDeviceLauncher(Launcher):
    @override
    def make_mesh(self) -> Mesh:
        return data_mesh(jax.local_devices()[:1])
