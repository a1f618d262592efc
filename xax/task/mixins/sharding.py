"""Where the train state and batches live: the parallel plan's mesh and shardings."""

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, PyTree

from xax.core.config import field
from xax.data.placement import batch_sharding, place_global_batch
from xax.parallel import (
    AXES,
    ParallelOptions,
    Plan,
    axis_sizes,
    batch_axis_size,
    make_mesh,
    mirror_specs,
    named,
    param_specs,
    plan_axis_sizes,
)
from xax.task.base import BaseConfig, BaseTask
from xax.task.mixins.train_step import TrainState


@dataclass
class ShardingConfig(BaseConfig):
    parallel: ParallelOptions = field(ParallelOptions(), help="How the model and batches are split over devices")


Config = TypeVar("Config", bound=ShardingConfig)


class ShardingMixin(BaseTask[Config], Generic[Config]):
    """The ``(data, fsdp, tensor)`` mesh of ``parallel`` and the layouts of the train state and batches."""

    mesh: Mesh | None = None

    def get_mesh(self) -> Mesh:
        """The run's one ``(data, fsdp, tensor)`` mesh: the axis sizes of ``parallel`` over the devices
        the launcher placed the task on, in their order (over the devices of ``self.mesh`` when one was
        set by hand, or the first device when the task was not launched)."""
        mesh = self.mesh
        if mesh is None or tuple(mesh.axis_names) != AXES:
            if mesh is not None:
                devices = list(mesh.devices.flat)
            elif self.placement is not None:
                devices = list(self.placement.devices)
            else:
                devices = jax.devices()[:1]
            mesh = self.mesh = make_mesh(devices, **plan_axis_sizes(self.plan, self.config.parallel))
        return mesh

    @property
    def plan(self) -> Plan:
        """The parallel plan of ``parallel.plan``."""
        return Plan.parse(self.config.parallel.plan)

    def train_state_shardings(self, ts: TrainState) -> TrainState:
        """The plan's NamedSharding for every leaf of ``ts`` (arrays or ShapeDtypeStructs): parameters
        by the rules, optimizer state and EMA like the parameters they mirror, the rest replicated.

        Raises:
            ShardingError: When a dimension the plan shards does not divide over its mesh axis.
        """
        mesh, plan = self.get_mesh(), self.plan
        sizes = axis_sizes(mesh)
        specs = param_specs(ts.params, plan, sizes)
        whole: Any = PartitionSpec()
        frozen = jax.tree.map(lambda _: whole, ts.frozen)
        opt_state = mirror_specs(ts.opt_state, ts.params, specs, plan, sizes)
        return named(mesh, TrainState(specs, frozen, opt_state, None if ts.ema is None else specs, whole, whole))

    def replicated_sharding(self) -> NamedSharding:
        return NamedSharding(self.get_mesh(), PartitionSpec())

    def batch_sharding(self) -> NamedSharding:
        """A batch's leading axis split over every batch axis of the mesh (data and fsdp), as
        ``xax.parallel.batch_spec`` lays out every batch."""
        return batch_sharding(self.get_mesh())

    def constrain_batch(self, batch: PyTree) -> PyTree:
        """Inside a jitted step: lays each batch leaf out along the batch axes, wherever it came from
        (a batch they cannot split, a last short validation batch, is left as it is)."""
        shards = batch_axis_size(self.get_mesh())
        sharding = self.batch_sharding()

        def constrain(x: Array) -> Array:
            if x.ndim == 0 or x.shape[0] % shards != 0:
                return x
            return jax.lax.with_sharding_constraint(x, sharding)

        return jax.tree.map(constrain, batch)

    def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Array]:
        """Shards a host batch over the mesh's batch axes; a batch they cannot split (a last, short
        validation batch) is replicated instead, so no sample is dropped. With several processes,
        each places its own rows (a ``ProcessRows``, or its share of a whole batch) of one global batch."""
        return place_global_batch(batch, self.get_mesh())
