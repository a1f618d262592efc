"""The device mesh: three named axes, ``data`` x ``fsdp`` x ``tensor``.

The tensor axis varies fastest, so tensor-parallel groups are neighbouring devices (the same host,
the fastest links), and the data axis slowest, so plain data parallelism spans hosts.
"""

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from xax.parallel.errors import MeshShapeError

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
AXES = (DATA, FSDP, TENSOR)
# The axes a batch is split over: every device of a (data, fsdp) slice holds a different shard.
BATCH_AXES = (DATA, FSDP)


def resolve_axis_sizes(num_devices: int, sizes: Mapping[str, int]) -> dict[str, int]:
    """Fills in the one axis given as -1 so that the sizes multiply to ``num_devices``.

    Args:
        num_devices: How many devices the mesh spans.
        sizes: A size per axis of ``AXES``; at most one may be -1 ("the rest").

    Returns:
        The size of every axis, in ``AXES`` order.

    Raises:
        MeshShapeError: When the sizes cannot multiply to ``num_devices``.
    """
    shown = " x ".join(f"{axis}={sizes[axis]}" for axis in AXES)
    rest = [axis for axis in AXES if sizes[axis] == -1]
    bad = [axis for axis in AXES if sizes[axis] < 1 and sizes[axis] != -1]
    if bad or len(rest) > 1:
        raise MeshShapeError(
            f"mesh {shown}: every axis size must be positive, and at most one -1 (the rest); "
            f"fix parallel.{(bad or rest)[-1]}"
        )
    known = math.prod(sizes[axis] for axis in AXES if axis not in rest)
    if rest:
        if num_devices % known != 0:
            raise MeshShapeError(
                f"mesh {shown} needs a multiple of {known} devices but {num_devices} are available; "
                f"set parallel.{'/'.join(a for a in AXES if a not in rest)} to divide {num_devices}"
            )
        return {axis: num_devices // known if axis in rest else sizes[axis] for axis in AXES}
    if known != num_devices:
        raise MeshShapeError(
            f"mesh {shown} spans {known} devices but {num_devices} are available; "
            f"make parallel.data x parallel.fsdp x parallel.tensor equal {num_devices} (one may be -1 for the rest)"
        )
    return dict(sizes)


def make_mesh(devices: Sequence[jax.Device], *, data: int = -1, fsdp: int = 1, tensor: int = 1) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices``, in their order.

    Args:
        devices: The devices, e.g. the launcher's; the order is kept (tensor varies fastest).
        data: Devices along the data axis; -1 for whatever the other axes leave.
        fsdp: Devices along the fully-sharded data-parallel axis.
        tensor: Devices along the tensor-parallel axis.

    Returns:
        The mesh.

    Raises:
        MeshShapeError: When the sizes do not multiply to the number of devices.
    """
    sizes = resolve_axis_sizes(len(devices), {DATA: data, FSDP: fsdp, TENSOR: tensor})
    grid = np.empty(len(devices), dtype=object)
    grid[:] = list(devices)
    return Mesh(grid.reshape(tuple(sizes[axis] for axis in AXES)), AXES)


def axis_sizes(mesh: Mesh) -> dict[str, int]:
    """The size of every axis of ``AXES`` in ``mesh`` (1 for an axis the mesh lacks)."""
    return {axis: int(mesh.shape.get(axis, 1)) for axis in AXES}


def batch_axis_size(mesh: Mesh) -> int:
    """How many shards a batch is split into: the product of the batch axes' sizes."""
    sizes = axis_sizes(mesh)
    return math.prod(sizes[axis] for axis in BATCH_AXES)
