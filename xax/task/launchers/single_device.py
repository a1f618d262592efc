"""Runs on the first local device."""

import jax
from typing_extensions import override

from xax.task.launchers.base import Launcher, Placement


class SingleDeviceLauncher(Launcher):
    @override
    def place(self) -> Placement:
        return Placement(tuple(jax.local_devices()[:1]))
