"""Plans by name: which mesh axis each logical axis of a parameter, and the batch, is split over.

- ``dp``: parameters replicated, the batch split over ``data``.
- ``fsdp``: parameters, gradients and optimizer state split over ``fsdp`` along the model width
  (``embed``); parameters no rule names along their largest dimension divisible by the axis.
- ``tp``: attention heads, feed-forward width and vocabulary split over ``tensor`` (q/k/v/up/gate
  column-parallel, o/down row-parallel, embedding and head vocabulary-parallel).
- Combinations join parts with ``+``: ``dp+tp``, ``fsdp+tp``, ``dp+fsdp`` (hybrid sharding).

Whatever the plan, the batch is split over ``data`` and ``fsdp`` together, and the optimizer
state and moving averages follow the parameter they mirror. XLA (GSPMD) inserts the collectives,
so the computation, and its numbers, are those of one device.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from xax.core.config import field
from xax.parallel.errors import BatchSizeError, PlanError, ShardingError
from xax.parallel.mesh import AXES, BATCH_AXES, DATA, FSDP, TENSOR, axis_sizes, batch_axis_size
from xax.parallel.rules import logical_axes
from xax.utils.pytree import path_name

# Plan part -> the mesh axis it splits over.
PARTS = {"dp": DATA, "fsdp": FSDP, "tp": TENSOR}
# Logical axis -> (the plan part that shards it, the mesh axis it goes on); others are never sharded.
LOGICAL_TO_MESH = {
    "embed": ("fsdp", FSDP),
    "heads": ("tp", TENSOR),
    "kv_heads": ("tp", TENSOR),
    "mlp": ("tp", TENSOR),
    "vocab": ("tp", TENSOR),
}


@dataclass
class ParallelOptions:
    plan: str = field(
        "dp",
        help="How parameters and batches are split over the devices: dp (replicate the model), fsdp (shard "
        "parameters and optimizer state), tp (tensor parallel), or parts joined by + (fsdp+tp, dp+tp, dp+fsdp)",
    )
    data: int | None = field(None, help="Devices on the data axis (None: the rest when the plan has dp, else 1)")
    fsdp: int | None = field(None, help="Devices on the fsdp axis (None: the rest when the plan has fsdp, else 1)")
    tensor: int | None = field(None, help="Devices on the tensor axis (None: the rest when the plan has tp, else 1)")
    report: bool = field(False, help="Log memory per device and FLOPs of the plan's compiled step before training")
    sharded_init: bool = field(
        True,
        help="Build the weights and optimizer state in one jitted program, each device making only its shards "
        "(needs a jittable get_model); false builds them eagerly on one device and then places them",
    )
    init_on_host: bool = field(
        True,
        help="With sharded_init on a GPU or TPU: compile and run that program on the host's CPU, then give each "
        "device its shards (GPT-2 small's init compiles in seconds there, in minutes for a GPU); false runs it on "
        "the devices, so that no host memory ever holds the whole state",
    )


@dataclass(frozen=True)
class Plan:
    """A parsed plan: the parts it combines (a subset of ``PARTS``)."""

    parts: frozenset[str]

    @classmethod
    def parse(cls, name: str) -> "Plan":
        """Parses ``"fsdp+tp"`` and the like.

        Raises:
            PlanError: For an empty or unknown part, naming the valid ones.
        """
        parts = [part.strip() for part in name.split("+")]
        unknown = [part for part in parts if part not in PARTS]
        if unknown or len(set(parts)) != len(parts):
            raise PlanError(
                f"parallel.plan={name!r} is not a plan; use one of {sorted(PARTS)} or parts joined by '+' (fsdp+tp)"
            )
        return cls(frozenset(parts))

    @property
    def name(self) -> str:
        return "+".join(part for part in PARTS if part in self.parts)

    def mesh_axis(self, logical: str | None) -> str | None:
        """The mesh axis a logical axis is split over under this plan, or None."""
        if logical not in LOGICAL_TO_MESH:
            return None
        part, axis = LOGICAL_TO_MESH[logical]
        return axis if part in self.parts else None


def plan_axis_sizes(plan: Plan, options: ParallelOptions) -> dict[str, int]:
    """The axis sizes to build the mesh with (-1: the rest), from the plan and the sizes set.

    An axis left unset is the rest when the plan uses it and 1 otherwise; a plan using several axes
    needs all but one set.

    Raises:
        PlanError: When an axis the plan does not use is set above 1, or too many are unset.
    """
    given = {DATA: options.data, FSDP: options.fsdp, TENSOR: options.tensor}
    used = {PARTS[part] for part in plan.parts}
    for axis, size in given.items():
        if size is not None and size not in (1, -1) and axis not in used:
            part = next(p for p, a in PARTS.items() if a == axis)
            raise PlanError(
                f"parallel.{axis}={size} but parallel.plan={plan.name!r} does not split over {axis}; "
                f"add {part} to the plan (e.g. {plan.name}+{part}) or set parallel.{axis}=1"
            )
    unset = [axis for axis in AXES if axis in used and given[axis] is None]
    has_rest = any(given[axis] == -1 for axis in AXES)
    if len(unset) > 1 and not has_rest:
        raise PlanError(
            f"parallel.plan={plan.name!r} splits over {' and '.join(unset)}: set all but one of "
            + ", ".join(f"parallel.{axis}" for axis in unset)
            + f" (e.g. parallel.{unset[-1]}=2)"
        )
    rest = unset[0] if len(unset) == 1 and not has_rest else None
    sizes: dict[str, int] = {}
    for axis in AXES:
        size = given[axis]
        sizes[axis] = (-1 if axis == rest else 1) if size is None else size
    return sizes


def _shards(spec: Sequence[str | None], sizes: Mapping[str, int]) -> PartitionSpec:
    # Axes of size one shard nothing; leaving them out keeps the specs readable and comparable.
    return PartitionSpec(*(axis if axis is not None and sizes[axis] > 1 else None for axis in spec))


def default_spec(shape: Sequence[int], plan: Plan, sizes: Mapping[str, int]) -> PartitionSpec:
    """The spec of a parameter no rule names: under fsdp its largest dimension divisible by the
    fsdp axis (the first of equals); otherwise, or when none divides, replicated."""
    num = sizes[FSDP]
    if "fsdp" not in plan.parts or num == 1:
        return PartitionSpec()
    candidates = [i for i, n in enumerate(shape) if n % num == 0 and n >= num]
    if not candidates:
        return PartitionSpec()
    best = max(candidates, key=lambda i: (shape[i], -i))
    return PartitionSpec(*(FSDP if i == best else None for i in range(len(shape))))


def param_spec(path: str, shape: Sequence[int], plan: Plan, sizes: Mapping[str, int]) -> PartitionSpec:
    """The PartitionSpec of one parameter under ``plan`` on a mesh of axis ``sizes``.

    Raises:
        ShardingError: When a dimension the plan shards is not divisible by its mesh axis.
    """
    axes = logical_axes(path, shape)
    if axes is None:
        return default_spec(shape, plan, sizes)
    spec = []
    for dim, (logical, size) in enumerate(zip(axes, shape, strict=True)):
        mesh_axis = plan.mesh_axis(logical)
        if mesh_axis is not None and size % sizes[mesh_axis] != 0:
            raise ShardingError(
                f"parameter {path} dimension {dim} ({logical}, size {size}) is not divisible by mesh axis "
                f"{mesh_axis}={sizes[mesh_axis]}; set parallel.{mesh_axis} to a divisor of {size}, make {logical} "
                f"a multiple of {sizes[mesh_axis]}, or use a plan that does not shard {logical}"
            )
        spec.append(mesh_axis)
    return _shards(spec, sizes)


def param_specs(params: PyTree, plan: Plan, sizes: Mapping[str, int]) -> PyTree:
    """The PartitionSpec of every array leaf of ``params`` (anything with a shape: arrays or
    ``jax.ShapeDtypeStruct``), in a tree of the same structure."""
    return jax.tree_util.tree_map_with_path(lambda path, x: param_spec(path_name(path), x.shape, plan, sizes), params)


def mirror_specs(tree: PyTree, params: PyTree, specs: PyTree, plan: Plan, sizes: Mapping[str, int]) -> PyTree:
    """Specs for a tree that holds copies of the parameters (optimizer state, moving averages).

    A leaf whose path ends with a parameter's path and has its shape takes that parameter's spec
    (the longest such path wins); scalars are replicated; any other leaf gets the default spec.
    """
    by_name = {
        path_name(path): (tuple(leaf.shape), spec)
        for (path, leaf), spec in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(specs, is_leaf=_is_spec), strict=True
        )
    }

    def spec_of(path: Sequence[Any], leaf: Any) -> PartitionSpec:
        shape = tuple(leaf.shape)
        if not shape:
            return PartitionSpec()
        names = path_name(path).split(".")
        for start in range(len(names)):
            found = by_name.get(".".join(names[start:]))
            if found is not None and found[0] == shape:
                return found[1]
        return default_spec(shape, plan, sizes)

    return jax.tree_util.tree_map_with_path(spec_of, tree)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def named(mesh: Mesh, specs: PyTree) -> PyTree:
    """NamedShardings on ``mesh`` for a tree of PartitionSpecs."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)


def gathered_spec(spec: PartitionSpec) -> PartitionSpec:
    """``spec`` without the fsdp axis: the layout a parameter is used in by the step.

    FSDP keeps parameters split over ``fsdp`` between steps; the step gathers each one (after the
    cast to the compute dtype, so bfloat16 crosses the links) and the gradients come back
    reduce-scattered. Without this constraint XLA's partitioner may instead move the activations,
    which for a language model are much larger than its weights.
    """

    def drop(entry: Any) -> Any:
        if entry == FSDP:
            return None
        if isinstance(entry, tuple):
            kept = tuple(axis for axis in entry if axis != FSDP)
            return kept if len(kept) > 1 else (kept[0] if kept else None)
        return entry

    return PartitionSpec(*(drop(entry) for entry in spec))


def gathered_shardings(shardings: PyTree) -> PyTree:
    """``gathered_spec`` for a tree of NamedShardings."""
    return jax.tree.map(lambda sh: NamedSharding(sh.mesh, gathered_spec(sh.spec)), shardings)


def batch_spec(mesh: Mesh | None = None) -> PartitionSpec:
    """The layout of every batch: its leading axis split over the batch axes (data and fsdp).

    The one place the batch layout is decided; the step's input shardings, the sharding
    constraints inside it and the placement of host batches (``xax.data.placement``) all use it.

    Args:
        mesh: The mesh the batch goes on; only the batch axes it has are used. None gives every
            batch axis (the ``(data, fsdp, tensor)`` mesh of ``make_mesh``).

    Returns:
        The PartitionSpec of a batch leaf (its other axes unsplit).
    """
    axes = BATCH_AXES if mesh is None else tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)
    return PartitionSpec(axes)


def check_batch_size(batch_size: int, grad_accum_steps: int, mesh: Mesh) -> None:
    """Raises unless each micro-batch splits evenly over the batch axes (data x fsdp).

    Raises:
        BatchSizeError: Naming the axes and the multiple to use.
    """
    sizes = axis_sizes(mesh)
    shards = batch_axis_size(mesh)
    per_step = grad_accum_steps * shards
    if batch_size % per_step != 0:
        raise BatchSizeError(
            f"batch_size={batch_size} is not divisible by grad_accum_steps x data x fsdp = "
            f"{grad_accum_steps} x {sizes[DATA]} x {sizes[FSDP]}; use a multiple of {per_step}"
        )


def shard_bytes(tree: PyTree) -> int:
    """Bytes one device holds of ``tree`` (arrays or ShapeDtypeStructs with shardings): the largest
    per-device total, since uneven shardings can load some devices more."""
    per_device: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        itemsize = np.dtype(leaf.dtype).itemsize
        for device, index in leaf.sharding.devices_indices_map(tuple(leaf.shape)).items():
            size = math.prod(len(range(*s.indices(n))) for s, n in zip(index, leaf.shape, strict=True))
            per_device[device] = per_device.get(device, 0) + size * itemsize
    return max(per_device.values(), default=0)


def total_bytes(tree: PyTree) -> int:
    """Bytes of ``tree`` as one copy (the global arrays)."""
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))
