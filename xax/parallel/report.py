"""The pre-flight report of a plan: memory per device and FLOPs of the compiled training step.

Parameter and optimizer memory come from the shardings alone (what each device holds); the
compiled step's memory comes from XLA's own analysis (``Compiled.memory_analysis``), which adds the
activations and temporaries, and its FLOPs from ``Compiled.cost_analysis`` (per device: an SPMD
program is the program of one device).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
from jax.sharding import PartitionSpec
from jaxtyping import PyTree

from xax.parallel.plan import shard_bytes, total_bytes
from xax.utils.pytree import path_name
from xax.utils.text import human_bytes


@dataclass(frozen=True)
class CompiledStats:
    """XLA's analysis of a compiled program, per device.

    Attributes:
        argument_bytes: Inputs (the train state and the batch).
        output_bytes: Outputs.
        alias_bytes: Outputs that reuse donated inputs' buffers (counted once).
        temp_bytes: Temporaries: activations kept for the backward pass, gradients, workspace.
        code_bytes: The generated code.
        flops: Floating-point operations of one call (None when XLA gives none).
    """

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float | None

    @property
    def peak_bytes(self) -> int:
        """Arguments, outputs not aliased to them, and temporaries: the step's footprint."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def compiled_stats(compiled: Any) -> CompiledStats:
    """Reads ``memory_analysis()`` and ``cost_analysis()`` of a ``jax.stages.Compiled``."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, Sequence):  # older jaxlibs give one dict per program
        cost = cost[0] if cost else None
    flops = None if not cost or "flops" not in cost else float(cost["flops"])
    return CompiledStats(
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        flops=flops,
    )


@dataclass(frozen=True)
class PlanReport:
    """What a plan costs each device, before training.

    Attributes:
        plan: The plan's name.
        mesh: The mesh's axis sizes.
        groups: Per part of the train state (params, opt_state, ema, ...): (bytes of one copy,
            bytes on the most loaded device).
        params: Per parameter: (dotted path, shape, dtype name, PartitionSpec).
        compiled: XLA's analysis of the training step, or None when it was not compiled.
    """

    plan: str
    mesh: Mapping[str, int]
    groups: Mapping[str, tuple[int, int]]
    params: Sequence[tuple[str, tuple[int, ...], str, PartitionSpec]]
    compiled: CompiledStats | None

    def lines(self) -> list[str]:
        """The report as text lines."""
        mesh = " x ".join(f"{axis}={size}" for axis, size in self.mesh.items())
        lines = [f"Plan {self.plan} on mesh {mesh}", "Train state (one copy -> per device)"]
        width = max((len(name) for name in self.groups), default=0)
        for name, (whole, per_device) in self.groups.items():
            lines.append(f"  {name.ljust(width)}  {human_bytes(whole, 2):>11} -> {human_bytes(per_device, 2):>11}")
        if self.compiled is not None:
            c = self.compiled
            lines.append("Compiled step, per device (XLA memory analysis)")
            for label, value in (
                ("arguments", c.argument_bytes),
                ("outputs", c.output_bytes),
                ("aliased (donated)", c.alias_bytes),
                ("temporaries", c.temp_bytes),
                ("peak estimate", c.peak_bytes),
            ):
                lines.append(f"  {label.ljust(17)}  {human_bytes(value, 2):>11}")
            flops = "n/a" if c.flops is None else f"{c.flops / 1e9:.3f} GFLOP"
            lines.append(f"  {'FLOPs per step'.ljust(17)}  {flops:>11}")
        lines.append("Parameters (shape, dtype, sharding)")
        width = max((len(name) for name, *_ in self.params), default=0)
        for name, shape, dtype, spec in self.params:
            lines.append(f"  {name.ljust(width)}  {shape!s:<18} {dtype:<8} {spec}")
        return lines


def make_report(
    plan: str,
    mesh: Mapping[str, int],
    groups: Mapping[str, PyTree],
    params: PyTree,
    compiled: Any | None,
) -> PlanReport:
    """Builds the report from abstract (or real) trees carrying shardings.

    Args:
        plan: The plan's name.
        mesh: The mesh's axis sizes.
        groups: Named parts of the train state, each a tree of arrays or ShapeDtypeStructs with shardings.
        params: The parameters, for the per-parameter table.
        compiled: The compiled training step (``jitted.lower(...).compile()``), or None.
    """
    table = [
        (path_name(path), tuple(leaf.shape), str(leaf.dtype), leaf.sharding.spec)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    ]
    sizes = {name: (total_bytes(tree), shard_bytes(tree)) for name, tree in groups.items()}
    return PlanReport(plan, dict(mesh), sizes, table, None if compiled is None else compiled_stats(compiled))
