"""Global batches on the mesh: how a batch is laid out, and which rows each process reads and places.

A batch's leading axis is split over the mesh's batch axes (``xax.parallel.batch_spec``). In a run
of several processes (``launcher.kind=multi_host``) a batch is one global array whose rows lie on
the devices of every process. Each process holds the rows that its devices hold under the batch
sharding, so it only needs to load those rows; the global array is then assembled with
``jax.make_array_from_process_local_data``. In a run of one process this is ``jax.device_put``.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array

from xax.data.columns import Batch
from xax.parallel.mesh import batch_axis_size
from xax.parallel.plan import batch_spec


class ProcessRows(dict[str, np.ndarray]):
    """This process's rows of a global batch, which has ``global_size`` rows in all.

    What a batch source yields in a run of several processes (see ``BatchSource.keep_rows``).
    """

    def __init__(self, rows: Batch, global_size: int) -> None:
        super().__init__(rows)
        self.global_size = global_size


def batch_sharding(mesh: Mesh, size: int | None = None) -> NamedSharding:
    """How a batch of ``size`` rows is placed: split over the batch axes (``batch_spec``), or
    replicated when they cannot split it evenly (a last, short validation batch), so no sample is
    dropped. Without a size, the split layout."""
    if size is not None and size % batch_axis_size(mesh) != 0:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, batch_spec(mesh))


def process_rows(mesh: Mesh, size: int) -> slice:
    """The rows of a global batch of ``size`` rows that this process's devices hold.

    Args:
        mesh: The mesh the batch is placed on (spanning every process).
        size: Rows in the global batch.

    Returns:
        A slice of the batch: all of it when the batch is replicated or there is one process.

    Raises:
        ValueError: When this process's devices hold rows that are not one contiguous block (a
            mesh whose batch axes interleave the processes' devices).
    """
    index_map = batch_sharding(mesh, size).addressable_devices_indices_map((size,))
    spans = sorted({(0, size) if index is None else index[0].indices(size)[:2] for index in index_map.values()})
    start, stop = spans[0]
    for span_start, span_stop in spans[1:]:
        if span_start > stop:
            raise ValueError(
                f"the devices of process {jax.process_index()} hold rows {spans} of a batch of {size}, not one "
                "block; order the mesh's devices by process"
            )
        stop = max(stop, span_stop)
    return slice(start, stop)


def place_rows(values: np.ndarray, mesh: Mesh, global_size: int, *, local: bool) -> Array:
    """One global array of ``global_size`` rows placed per ``batch_sharding``.

    Args:
        values: This process's rows (``local``) or the whole global array.
        mesh: The mesh to place it on.
        global_size: Rows of the global array.
        local: Whether ``values`` holds only this process's rows (see ``process_rows``).

    Returns:
        The global array.
    """
    sharding = batch_sharding(mesh, global_size)
    if jax.process_count() == 1:
        return jax.device_put(values, sharding)
    rows = values if local else values[process_rows(mesh, global_size)]
    return jax.make_array_from_process_local_data(sharding, rows, (global_size, *values.shape[1:]))


def place_global_batch(batch: Batch, mesh: Mesh) -> dict[str, Array]:
    """A host batch on the devices: a ``ProcessRows`` holds this process's rows only; any other
    batch is the whole global batch, of which this process places its rows."""
    local = isinstance(batch, ProcessRows)
    first = next(iter(batch.values()))
    size = batch.global_size if isinstance(batch, ProcessRows) else int(first.shape[0])
    if jax.process_count() == 1:
        return jax.device_put(dict(batch), batch_sharding(mesh, size))
    return {name: place_rows(values, mesh, size, local=local) for name, values in batch.items()}
