"""Pytrees as checkpoints see them: arrays by dotted name, restore targets, shape comparisons."""

from typing import Any

import jax
from etils import epath
from jaxtyping import PyTree

from xax.core.errors import CheckpointError
from xax.utils.pytree import path_name


def abstract_like(tree: PyTree) -> PyTree:
    """Shapes, dtypes and shardings of ``tree``: the target a checkpoint is restored into, so it
    lands on the current mesh whatever mesh it was saved under."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def named_leaves(tree: PyTree) -> dict[str, Any]:
    """Leaves by dotted path. A checkpoint read without a target comes back as nested dicts, the
    model as modules and named tuples; their paths agree once spelled as names."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {path_name(path): leaf for path, leaf in flat if leaf is not None}


def check_shapes(target: PyTree, saved: PyTree, source: epath.PathLike) -> None:
    """Raises if a saved array's shape differs from the model's, naming the parameter path."""
    saved_leaves = named_leaves(saved)
    for name, leaf in named_leaves(target).items():
        if name in saved_leaves and tuple(saved_leaves[name].shape) != tuple(leaf.shape):
            raise CheckpointError(
                f"parameter {name} has shape {tuple(leaf.shape)} in the model but "
                f"{tuple(saved_leaves[name].shape)} in {source}; change the config back or restore partially"
            )


def tree_differences(target: PyTree, saved: PyTree) -> list[str]:
    """How the arrays of ``target`` differ from the saved ones: names on one side only, and shapes."""
    wanted, found = named_leaves(target), named_leaves(saved)
    differences = []
    for name, leaf in wanted.items():
        if name not in found:
            differences.append(f"{name} is not in the checkpoint")
        elif tuple(found[name].shape) != tuple(leaf.shape):
            shapes = f"{tuple(leaf.shape)} in the model but {tuple(found[name].shape)} in the checkpoint"
            differences.append(f"parameter {name} has shape {shapes}")
    differences += [f"{name} is only in the checkpoint" for name in found if name not in wanted]
    return differences
