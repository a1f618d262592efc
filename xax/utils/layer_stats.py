"""Training dynamics per module, computed inside the step: gradient and parameter norms, the size of
the update relative to the parameters, and non-finite gradient entries.

Leaves are grouped by module from their dotted names (``xax.utils.pytree.path_name``): each
top-level block (``blocks.3``, ``embed``) and each leaf's own module (``blocks.3.attn.q_proj``).
The step reduces every leaf to four numbers and sums them per group (a few small gathers of a
(leaves, 4) array), and the groups' statistics join the other metric sums on the device.
"""

import math
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

# Logged names: ``layers/<group>/<statistic>``.
PREFIX = "layers/"
STATISTICS = ("grad_norm", "param_norm", "update_ratio", "nonfinite")
# Parameter values drawn per top-level block for its histogram (an even stride over its leaves).
HISTOGRAM_VALUES = 4096


def top_level_name(name: str) -> str:
    """The top-level block of a dotted parameter name: its first part, with the index that follows
    it in a list of blocks (``blocks.3.attn.q_proj.weight`` -> ``blocks.3``); ``root`` for a leaf of
    the model itself."""
    parts = name.split(".")
    if len(parts) == 1:
        return "root"
    return ".".join(parts[: 2 if len(parts) > 2 and parts[1].isdigit() else 1])


def layer_groups(names: Sequence[str]) -> list[tuple[str, tuple[int, ...]]]:
    """The groups of parameter leaves, each as (name, indices of its leaves in ``names``).

    Args:
        names: The parameter leaves' dotted names, in the order of ``jax.tree.leaves(params)``.

    Returns:
        One group per top-level block (the first part of a name, with the index that follows it in a
        list of blocks) and one per module holding leaves (the name without its last part; ``root``
        for leaves of the model itself), in order of first appearance, without repeats.

    Examples:
        >>> groups = layer_groups(["embed.weight", "blocks.0.attn.q_proj.weight", "blocks.0.norm.weight"])
        >>> [(name, list(leaves)) for name, leaves in groups]
        [('embed', [0]), ('blocks.0', [1, 2]), ('blocks.0.attn.q_proj', [1]), ('blocks.0.norm', [2])]
    """
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        top = top_level_name(name)
        owners = [top] if top == "root" else [top, name.rsplit(".", 1)[0]]
        for owner in dict.fromkeys(owners):
            groups.setdefault(owner, []).append(index)
    return [(name, tuple(indices)) for name, indices in groups.items()]


# Leaves of at most this many entries are reduced together, stacked in rows of a common width.
SMALL_LEAF = 1 << 16


def leaf_sums(values: Sequence[Array], together: Sequence[bool] | None = None) -> Float[Array, " leaves"]:
    """The float32 sum of each array, with the small ones summed together.

    One reduction per leaf means one kernel per leaf, and on a GPU a model's many small leaves (biases,
    norm scales: about 120 in GPT-2 small) cost more in kernel launches than in bytes. Leaves of at most
    ``SMALL_LEAF`` entries are padded with zeros to the next power of two and stacked, so that each width
    takes one reduction; larger ones are summed one by one.

    Args:
        values: Arrays to sum (already transformed: squares, non-finite flags...).
        together: Per array, whether it may be stacked with others (default: all). A sharded array
            may not: stacking it would gather it onto every device, a collective per leaf, where its
            own sum takes one reduction and one scalar all-reduce.

    Returns:
        Their sums, in order.

    Examples:
        >>> import jax.numpy as jnp
        >>> leaf_sums([jnp.ones(3), jnp.arange(4.0), jnp.ones((300, 300))]).tolist()
        [3.0, 6.0, 90000.0]
    """
    if together is not None and len(together) != len(values):
        raise ValueError(f"leaf_sums got {len(values)} arrays but {len(together)} 'together' flags; give one per array")
    sums: list[Array | None] = [None] * len(values)
    by_width: dict[int, list[int]] = {}
    for index, value in enumerate(values):
        if 0 < value.size <= SMALL_LEAF and (together is None or together[index]):
            by_width.setdefault(1 << (value.size - 1).bit_length(), []).append(index)
    for width, indices in by_width.items():
        if len(indices) < 2:
            continue
        rows = [jnp.pad(jnp.ravel(values[i]).astype(jnp.float32), (0, width - values[i].size)) for i in indices]
        totals = jnp.sum(jnp.stack(rows), axis=1)
        for row, index in enumerate(indices):
            sums[index] = totals[row]
    return jnp.stack([jnp.sum(v, dtype=jnp.float32) if s is None else s for v, s in zip(values, sums, strict=True)])


def group_statistics(
    groups: Sequence[tuple[str, Sequence[int]]],
    grad_squares: Float[Array, " leaves"],
    grad_nonfinite: Float[Array, " leaves"],
    param_squares: Float[Array, " leaves"],
    update_squares: Float[Array, " leaves"],
) -> dict[str, Array]:
    """Each group's statistics from per-leaf reductions.

    For a group g with leaves L: ``grad_norm = sqrt(sum_L |grad|^2)``, ``param_norm = sqrt(sum_L |p|^2)``
    (the parameters the step started from), ``update_ratio = sqrt(sum_L |p' - p|^2) / param_norm``
    (the update applied; 0 for a zero norm or a skipped step) and ``nonfinite``, the count of
    non-finite gradient entries.

    Args:
        groups: From ``layer_groups``.
        grad_squares: Per leaf, the sum of the squared gradient entries.
        grad_nonfinite: Per leaf, the number of non-finite gradient entries.
        param_squares: Per leaf, the sum of the squared parameters.
        update_squares: Per leaf, the sum of the squared applied update.

    Returns:
        ``layers/<group>/<statistic>`` -> float32 scalar.
    """
    per_leaf = jnp.stack([grad_squares, param_squares, update_squares, grad_nonfinite], axis=1)  # (leaves, 4)
    # Gathers, not a 0/1 matrix product: 0 x NaN would spread one group's NaN gradient to every group.
    totals = jnp.stack([jnp.sum(per_leaf[np.asarray(indices)], axis=0) for _, indices in groups])  # (groups, 4)
    grad_norm, param_norm, update_norm = (jnp.sqrt(totals[:, i]) for i in range(3))
    ratio = jnp.where(param_norm > 0, update_norm / jnp.where(param_norm > 0, param_norm, 1.0), 0.0)
    values: dict[str, Array] = {}
    for row, (name, _) in enumerate(groups):
        for statistic, column in zip(STATISTICS, (grad_norm, param_norm, ratio, totals[:, 3]), strict=True):
            values[f"{PREFIX}{name}/{statistic}"] = column[row]
    return values


def parameter_samples(named: Mapping[str, Array], per_group: int = HISTOGRAM_VALUES) -> dict[str, Array]:
    """Values of each top-level block's parameters for a histogram, taken on the device.

    Every ``stride``-th entry of each leaf of the block, the stride chosen so that the block gives
    about ``per_group`` values (all of them for a smaller block): the histogram's shape without
    copying a large model to the host.

    Args:
        named: The parameter leaves by dotted name (``xax.checkpoint.named_leaves``).
        per_group: About how many values each block gives.

    Returns:
        ``layers/<block>/params`` -> a float32 vector.
    """
    blocks: dict[str, list[Array]] = {}
    for name, leaf in named.items():
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            blocks.setdefault(top_level_name(name), []).append(leaf)
    samples: dict[str, Array] = {}
    for block, leaves in blocks.items():
        stride = max(1, math.ceil(sum(leaf.size for leaf in leaves) / per_group))
        parts = [jnp.ravel(leaf)[::stride].astype(jnp.float32) for leaf in leaves]
        samples[f"{PREFIX}{block}/params"] = jnp.concatenate(parts)
    return samples


def module_histograms(layers: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Each statistic over the leaf modules, for a histogram (how the gradient norms or update
    ratios spread across the model).

    Args:
        layers: Logged statistics, ``layers/<group>/<statistic>`` -> value.

    Returns:
        ``layers/<statistic>`` -> the values of the leaf modules: the groups no other group lies
        inside (``blocks.0.attn.q_proj``, not ``blocks.0``).

    Examples:
        >>> hist = module_histograms({"layers/blocks.0/grad_norm": 5.0, "layers/blocks.0.mlp/grad_norm": 3.0,
        ...                           "layers/blocks.0.attn/grad_norm": 4.0})
        >>> hist["layers/grad_norm"].tolist()
        [3.0, 4.0]
    """
    by_group: dict[str, dict[str, float]] = {}
    for key, value in layers.items():
        group, _, statistic = key.removeprefix(PREFIX).rpartition("/")
        if key.startswith(PREFIX) and group and statistic in STATISTICS:
            by_group.setdefault(group, {})[statistic] = value
    leaves = [g for g in by_group if not any(other.startswith(g + ".") for other in by_group)]
    return {
        f"{PREFIX}{statistic}": np.asarray([by_group[g][statistic] for g in leaves if statistic in by_group[g]])
        for statistic in STATISTICS
        if any(statistic in by_group[g] for g in leaves)
    }
