"""Training dynamics per module, computed inside the step: gradient and parameter norms, the size of
the update relative to the parameters, and non-finite gradient entries.

Leaves are grouped by module from their dotted names (``xax.utils.pytree.path_name``): each
top-level block (``blocks.3``, ``embed``) and each leaf's own module (``blocks.3.attn.q_proj``).
The step reduces every leaf to four numbers and sums them per group (a few small gathers of a
(leaves, 4) array), and the groups' statistics join the other metric sums on the device.
"""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

# Logged names: ``layers/<group>/<statistic>``.
PREFIX = "layers/"
STATISTICS = ("grad_norm", "param_norm", "update_ratio", "nonfinite")


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
        parts = name.split(".")
        if len(parts) == 1:
            owners = ["root"]
        else:
            top = 2 if len(parts) > 2 and parts[1].isdigit() else 1
            owners = [".".join(parts[:top]), ".".join(parts[:-1])]
        for owner in dict.fromkeys(owners):
            groups.setdefault(owner, []).append(index)
    return [(name, tuple(indices)) for name, indices in groups.items()]


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
