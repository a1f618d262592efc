"""A training checkpoint's weights outside training: a model for sampling or evaluation, or the
initial weights of a new run."""

import logging
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jaxtyping import PyTree

from xax.checkpoint.renames import Rename, legacy_renames, rename_saved
from xax.checkpoint.restore import load_arrays_anywhere, resolve_checkpoint
from xax.checkpoint.tree import check_shapes, named_leaves
from xax.core.errors import CheckpointError
from xax.utils.pytree import path_name
from xax.utils.storage import storage_path

logger = logging.getLogger(__name__)


def _first_device() -> jax.sharding.Sharding:
    return jax.sharding.make_single_device_sharding(jax.local_devices()[0])


def restore_weights(
    template: PyTree,
    directory: epath.PathLike,
    step: int,
    *,
    prefer_ema: bool = True,
    renames: Sequence[Rename] | None = None,
) -> PyTree:
    """``template`` with its floating-point arrays replaced by those saved in a training checkpoint.

    For using a trained model outside training (sampling, evaluation), on this process's first
    device (each process of a multi-process job reads its own copy), whatever mesh saved it.

    Args:
        template: A model of the same configuration as the saved one (its weights are not used).
        directory: The checkpoints folder (see ``resolve_checkpoint``).
        step: The step to read.
        prefer_ema: Take the moving average of the weights when the checkpoint kept one.
        renames: How the parameters were once named (``xax.checkpoint.renames``); None takes those
            the template's modules declare, so checkpoints of before a rename still restore.

    Returns:
        The model, with the checkpoint's weights cast to ``template``'s dtypes.

    Raises:
        CheckpointError: If a parameter of ``template`` is missing from the checkpoint or has another shape.
    """
    directory = storage_path(directory)
    tree = load_arrays_anywhere(directory, step, _first_device())
    weights = tree["ema"] if prefer_ema and tree.get("ema") is not None else tree["params"]
    arrays, static = eqx.partition(template, eqx.is_inexact_array)
    wanted = named_leaves(arrays)
    renames = legacy_renames(template) if renames is None else tuple(renames)
    found = rename_saved(wanted, named_leaves(weights), renames)
    check_shapes(arrays, found, directory / str(step))
    missing = sorted(wanted.keys() - found.keys())
    if missing:
        raise CheckpointError(f"{directory / str(step)} has no {missing[0]}; it holds a different model")
    leaves = [jnp.asarray(found[name], dtype=leaf.dtype) for name, leaf in wanted.items()]
    return eqx.combine(jax.tree.unflatten(jax.tree.structure(arrays), leaves), static)


def warm_start_weights(params: PyTree, path: epath.PathLike, renames: Sequence[Rename] | None = None) -> PyTree:
    """Copies the model weights of the checkpoint at ``path`` into ``params`` where the paths match
    (a backbone into a model with a new head), each placed with its own parameter's sharding.

    Args:
        params: The model's arrays, as the training state holds them.
        path: A step directory, a checkpoints directory or a run directory (its newest checkpoint).
        renames: How the parameters were once named; None takes those ``params``' modules declare.

    Returns:
        ``params`` with every array that the checkpoint holds under the same name replaced.

    Raises:
        CheckpointError: When a saved array's shape differs from the model's, naming the parameter.
    """
    directory, steps = resolve_checkpoint(path)
    # Read onto one device, then place each array with its own parameter's sharding (a plan's
    # shardings differ from leaf to leaf, in rank too).
    tree = load_arrays_anywhere(directory, steps[0], _first_device())
    renames = legacy_renames(params) if renames is None else tuple(renames)
    saved = rename_saved(named_leaves(params), named_leaves(tree["params"]), renames)
    check_shapes(params, saved, directory / str(steps[0]))
    loaded = 0

    def take(key_path: Any, leaf: jax.Array) -> jax.Array:
        nonlocal loaded
        name = path_name(key_path)
        if name in saved:
            loaded += 1
            return jax.device_put(np.asarray(saved[name], dtype=leaf.dtype), leaf.sharding)
        return leaf

    result = jax.tree_util.tree_map_with_path(take, params)
    logger.info("Warm start: %d of %d arrays from %s", loaded, len(jax.tree.leaves(params)), directory)
    return result
