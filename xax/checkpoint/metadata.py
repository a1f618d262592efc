"""A checkpoint's JSON metadata: counters, data cursor, resolved config, versions and mesh."""

from typing import Any

import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from xax.checkpoint.manager import CheckpointOptions, open_orbax_manager
from xax.checkpoint.quiet import quiet_orbax
from xax.core.errors import CheckpointError
from xax.core.state import State
from xax.utils.storage import storage_path

CHECKPOINT_FORMAT = 1


def checkpoint_metadata(
    state: State,
    cursor: dict[str, int],
    config: dict[str, Any],
    mesh: Mesh | None,
    *,
    git_commit: str | None = None,
    valid_metrics: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The metadata a training checkpoint carries beside its arrays.

    Args:
        state: The training counters at the checkpoint's step.
        cursor: The data position to resume from (``Cursor.to_dict()``).
        config: The resolved config, as plain values.
        mesh: The mesh the arrays were saved under (None for none).
        git_commit: The commit of the code that trained, when known.
        valid_metrics: The validation metrics measured at this step (empty when none ran).

    Returns:
        A JSON-serializable dictionary.
    """
    from xax import __version__

    return {
        "format": CHECKPOINT_FORMAT,
        "state": state.to_dict(),
        "cursor": dict(cursor),
        "config": config,
        "xax_version": __version__,
        "git_commit": git_commit,
        "mesh": {"axis_names": list(mesh.axis_names), "shape": list(mesh.devices.shape)} if mesh else None,
        "valid_metrics": dict(valid_metrics or {}),
    }


def read_metadata(directory: epath.PathLike, step: int) -> dict[str, Any]:
    """A checkpoint's JSON metadata alone (counters, cursor, config, versions, mesh)."""
    directory = storage_path(directory)
    with quiet_orbax():
        manager = open_orbax_manager(directory, CheckpointOptions(), read_only=True)
        try:
            return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        except Exception as error:
            raise CheckpointError(f"checkpoint {directory / str(step)} is unreadable ({error})") from error
        finally:
            manager.close()


def flatten_dict(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": value}`` (an empty dict stays a value, so it can be compared)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_drift(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every config value that differs between a checkpoint's config
    and the current one (``resume`` and ``warm_start``, which name checkpoints, left out)."""
    flat_current, flat_saved = flatten_dict(current), flatten_dict(saved)
    return [
        f"{key}: {flat_saved.get(key)!r} -> {flat_current.get(key)!r}"
        for key in sorted(set(flat_current) | set(flat_saved))
        if flat_current.get(key) != flat_saved.get(key) and key not in ("resume", "warm_start")
    ]
