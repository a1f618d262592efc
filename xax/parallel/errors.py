"""Mistakes in a parallel plan a user can fix, caught before anything is compiled."""

from xax.core.errors import LaunchError, XaxError


class PlanError(XaxError):
    """``parallel.plan`` is unknown, or an axis size does not fit the plan."""


class MeshShapeError(XaxError):
    """The mesh's axis sizes do not multiply to the number of devices."""


class ShardingError(XaxError):
    """A dimension the plan shards is not divisible by the size of its mesh axis."""


class BatchSizeError(LaunchError):
    """The batch does not split evenly over the data-parallel axes (data x fsdp)."""
