"""FLOPs of a jitted function from XLA's cost analysis, with its loops counted as often as they run.

XLA's ``HloCostAnalysis`` counts a ``while`` loop's body once, whatever its trip count, so a model
whose layers run under ``lax.scan`` (a transformer with ``scan_layers=True``) would be undercounted
by its depth. The count here is XLA's for the program as JAX emitted it (before XLA's own
optimizations, so before any backend unrolls or fuses anything, and the same on every backend),
plus, for every ``scan``, the matmul and convolution FLOPs of the iterations XLA did not count,
read from the jaxpr, where the trip count is known. The FLOPs of a ``while_loop`` of unknown trip
count stay counted once.
"""

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax.extend.core as jex
from jax._src.interpreters import partial_eval as pe  # dce_jaxpr has no public alias


def xla_flops(cost: Mapping[str, float] | Sequence[Mapping[str, float]] | None) -> float | None:
    """The ``flops`` entry of a cost analysis, which JAX versions return as a dict or a list of dicts.

    Examples:
        >>> xla_flops([{"flops": 10.0}, {"flops": 5.0}]), xla_flops({"bytes accessed": 4.0})
        (15.0, None)

    Args:
        cost: What ``Lowered.cost_analysis()`` or ``Compiled.cost_analysis()`` returned.

    Returns:
        The FLOPs summed over the entries, or None when there is no analysis or no ``flops`` entry.
    """
    if cost is None:
        return None
    entries = [cost] if isinstance(cost, Mapping) else list(cost)
    values = [float(entry["flops"]) for entry in entries if "flops" in entry]
    return sum(values) if values else None


def _shape(var: Any) -> tuple[int, ...]:
    """The shape of a jaxpr variable (every operand of a matmul or convolution is a shaped array)."""
    return tuple(var.aval.shape)


def dot_general_flops(eqn: jex.JaxprEqn) -> int:
    """``2 * (output elements) * (contracted size)``: one multiply and one add per term."""
    lhs = _shape(eqn.invars[0])
    (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
    contracted = math.prod(lhs[d] for d in lhs_contracting)
    return 2 * math.prod(_shape(eqn.outvars[0])) * contracted


def conv_flops(eqn: jex.JaxprEqn) -> int:
    """``2 * (output elements) * (kernel elements per output feature)``, which holds for feature and
    batch groups alike."""
    rhs = _shape(eqn.invars[1])
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    per_output = math.prod(rhs) // rhs[out_feature_dim]
    return 2 * math.prod(_shape(eqn.outvars[0])) * per_output


def _subjaxprs(eqn: jex.JaxprEqn) -> Iterator[jex.Jaxpr]:
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jex.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex.Jaxpr):
                yield item


def _scan_copies_counted(length: int, unroll: int) -> int:
    """How many copies of a scan body XLA's analysis sees: JAX lowers ``unroll`` copies into the
    loop body (counted once) plus the remainder unrolled outside, or everything unrolled."""
    if unroll == 0:
        return length
    trips, remainder = divmod(length, unroll)
    if unroll != 1 and trips == 1 and remainder == 0:
        return length
    return (unroll if trips >= 1 else 0) + remainder


def matmul_flops(jaxpr: jex.Jaxpr) -> tuple[int, int]:
    """Matmul and convolution FLOPs of a jaxpr: as executed, and as XLA's cost analysis counts them.

    Args:
        jaxpr: The jaxpr (``jax.jit(f).trace(*args).jaxpr.jaxpr``).

    Returns:
        ``(executed, counted)``: every scan iteration counted in the first, the loop bodies once
        (as XLA does) in the second. A ``cond`` counts its costliest branch in both, as XLA does.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> def f(a, b):
        ...     return jax.lax.scan(lambda c, _: (c @ b, None), a, length=3)[0]
        >>> x = jnp.ones((4, 4))
        >>> matmul_flops(jax.jit(f).trace(x, x).jaxpr.jaxpr)  # 2 * 4 * 4 * 4 per matmul
        (384, 128)
    """
    executed = counted = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            flops = dot_general_flops(eqn)
            executed, counted = executed + flops, counted + flops
        elif name == "conv_general_dilated":
            flops = conv_flops(eqn)
            executed, counted = executed + flops, counted + flops
        elif name == "scan":
            body_executed, body_counted = matmul_flops(eqn.params["jaxpr"].jaxpr)
            length = int(eqn.params["length"])
            executed += length * body_executed
            counted += _scan_copies_counted(length, int(eqn.params["unroll"])) * body_counted
        elif name == "cond":
            branches = [matmul_flops(branch.jaxpr) for branch in eqn.params["branches"]]
            executed += max(b[0] for b in branches)
            counted += max(b[1] for b in branches)
        else:
            for sub in _subjaxprs(eqn):
                sub_executed, sub_counted = matmul_flops(sub)
                executed, counted = executed + sub_executed, counted + sub_counted
    return executed, counted


def step_flops(traced: Any) -> float | None:
    """FLOPs of one call of a jitted function, from XLA's cost analysis of its unoptimized program.

    Args:
        traced: ``jax.jit(f).trace(*args)``. Lowering it reuses the lowering that calling the
            function with the same arguments makes (or made), so it compiles nothing.

    Returns:
        The FLOPs of the whole program (over all devices, for a sharded one), with every ``scan``
        iteration counted. Where the backend gives no analysis of the unoptimized program (the
        GPU backend of some JAX versions), the matmul and convolution FLOPs of the jaxpr alone,
        which are all but a few percent of a network's (the analysis of the optimized program is
        no substitute there: it does not count the GEMMs XLA hands to cuBLAS).
    """
    # JAX drops unused computations (such as an input's gradient nothing reads) before lowering.
    jaxpr = traced.jaxpr.jaxpr
    live, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    executed, counted = matmul_flops(live)
    counted_by_xla = xla_flops(traced.lower().cost_analysis())
    if counted_by_xla is None:
        return float(executed)
    return counted_by_xla + float(executed - counted)
