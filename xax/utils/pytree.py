"""Pytree utilities: dotted names of key paths and dtype casts of floating-point leaves."""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import PyTree


def path_name(path: Sequence[Any]) -> str:
    """A key path as a dotted name (``layers.self_attn.q_proj.weight``), as checkpoints spell it.

    Attribute names, dictionary keys and sequence indices all become plain dotted parts, so a
    module and the nested dictionaries a checkpoint is read back as give the same names.

    Args:
        path: A key path, as ``jax.tree_util.tree_flatten_with_path`` gives it.

    Returns:
        The parts of ``path`` joined by dots; ``""`` for the empty path (the root).

    Examples:
        >>> import jax
        >>> tree = {"encoder": {"layers": [1.0, 2.0]}, "head": 3.0}
        >>> [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
        ['encoder.layers.0', 'encoder.layers.1', 'head']
    """
    return jax.tree_util.keystr(tuple(path), simple=True, separator=".")


def cast_floating(tree: PyTree, dtype: DTypeLike) -> PyTree:
    """Casts the real floating-point array leaves of ``tree`` to ``dtype``, leaving the others alone.

    Integer, boolean and complex arrays and non-array leaves are returned unchanged, so a model
    can be cast to its compute dtype without touching its index buffers.

    Args:
        tree: Any pytree (a model, a batch, parameters).
        dtype: The floating-point dtype to cast to.

    Returns:
        A tree of the same structure.

    Examples:
        >>> import jax.numpy as jnp
        >>> cast = cast_floating({"w": jnp.ones(2), "ids": jnp.arange(2)}, jnp.bfloat16)
        >>> cast["w"].dtype, cast["ids"].dtype
        (dtype(bfloat16), dtype('int32'))
    """
    dtype = jnp.dtype(dtype)

    def cast(leaf: Any) -> Any:
        if eqx.is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != dtype:
            return leaf.astype(dtype)
        return leaf

    return jax.tree.map(cast, tree)
