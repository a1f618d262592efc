"""Reading checkpoints: onto any mesh, verified against their checksums, falling back past
unreadable ones, and naming what differs when a checkpoint does not fit the restore target."""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jaxtyping import PyTree

from xax.checkpoint.checksums import read_checksums, verify_checksums
from xax.checkpoint.errors import CheckpointMismatchError, CorruptCheckpointError
from xax.checkpoint.manager import CheckpointManager, CheckpointOptions, checkpoint_steps, open_orbax_manager
from xax.checkpoint.metadata import config_drift, read_metadata
from xax.checkpoint.quiet import drop_abandoned_io_reports, one_line, quiet_orbax, root_cause, tell
from xax.checkpoint.remote import is_committed, prepare_orbax
from xax.checkpoint.renames import (
    Rename,
    RenamePlan,
    legacy_renames,
    plan_renames,
    renamed_leaf,
    transposed_sharding,
)
from xax.checkpoint.tree import abstract_like, named_leaves, tree_differences
from xax.core.errors import CheckpointError
from xax.utils.pytree import path_name
from xax.utils.storage import filesystem, forget_listings, is_remote, storage_path

# Where a run's unreadable checkpoints go when resuming falls back past them (inside `checkpoints/`).
CORRUPT_DIR = "corrupt"


@dataclass(frozen=True)
class RestoredCheckpoint:
    """One checkpoint as read back: its arrays and its JSON metadata.

    Attributes:
        tree: The arrays, in the restore target's structure, shapes and shardings.
        step: The checkpoint's step.
        path: The checkpoint's directory.
        metadata: The JSON metadata saved beside the arrays.
    """

    tree: PyTree
    step: int
    path: epath.Path
    metadata: dict[str, Any]


def resolve_checkpoint(path: epath.PathLike) -> tuple[epath.Path, list[int]]:
    """Splits a user-given path into (checkpoints directory, candidate steps, newest first).

    Accepts a step directory, a checkpoints directory, or a run directory holding ``checkpoints``,
    each a local path or a ``gs://``/``s3://`` URL.
    """
    path = storage_path(path)
    forget_listings(path)
    if not is_remote(path):
        path = path.resolve()
    if path.name.isdigit() and path.is_dir():
        return path.parent, [int(path.name)]
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = checkpoint_steps(directory)
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {directory}; pass a run directory or a checkpoint path")
    return directory, steps[::-1]


def _structure_mismatch(error: BaseException) -> list[str] | None:
    """The tree paths orbax lists when the restore target and the saved tree differ in structure,
    or None when ``error`` is not that."""
    text = str(error)
    if "tree structures do not match" not in text:
        return None
    body = text.split("do not match", 1)[1].split("If this mismatch is intentional", 1)[0]
    return [line.strip().rstrip(":") for line in body.splitlines() if line.strip().endswith(":")]


def load_checkpoint(directory: epath.PathLike, step: int, target: PyTree | None) -> tuple[PyTree, dict[str, Any]]:
    """Reads one checkpoint: the arrays (into ``target``'s shapes and shardings) and the metadata,
    and verifies the arrays against the checksums recorded with them.

    Raises:
        CheckpointError: Naming the file when the checkpoint is missing, truncated or corrupt
            (``CorruptCheckpointError`` when an array does not match its checksum), or
            ``CheckpointMismatchError`` when ``target``'s tree differs from the saved one.
    """
    directory = storage_path(directory)
    step_dir = directory / str(step)
    recorded = read_checksums(step_dir)
    drop_abandoned_io_reports()
    with quiet_orbax():
        manager = open_orbax_manager(directory, CheckpointOptions(), read_only=True)
        try:
            state_args = ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
            restored = manager.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
        except Exception as error:
            paths = _structure_mismatch(error)
            if paths is not None:
                raise CheckpointMismatchError(
                    f"checkpoint {step_dir} holds another tree of arrays than this run's at {', '.join(paths[:3])}"
                ) from error
            cause = root_cause(error)
            raise CheckpointError(
                f"checkpoint {step_dir} is unreadable ({type(cause).__name__}: {one_line(cause)})"
            ) from error
        finally:
            manager.close()
    if recorded is not None:
        verify_checksums(restored["state"], recorded, step_dir)
    return restored["state"], dict(restored["meta"])


def saved_array_metadata(directory: epath.PathLike, step: int) -> PyTree:
    """The saved arrays' shapes and dtypes (no data read), as nested dicts."""
    directory = storage_path(directory)
    prepare_orbax(directory)
    try:
        with quiet_orbax():
            return ocp.StandardCheckpointer().metadata(directory / str(step) / "state").item_metadata
    except Exception as error:
        raise CheckpointError(f"checkpoint {directory / str(step) / 'state'} is unreadable ({error})") from error


def load_arrays_anywhere(directory: epath.PathLike, step: int, sharding: jax.sharding.Sharding) -> PyTree:
    """Every saved array, placed with ``sharding`` (e.g. one device), whatever mesh saved them:
    for reading a checkpoint without the model that wrote it. Verified against its checksums."""
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding),
        saved_array_metadata(directory, step),
        is_leaf=lambda leaf: hasattr(leaf, "shape") and hasattr(leaf, "dtype"),
    )
    tree, _ = load_checkpoint(directory, step, target)
    return tree


def restore_latest(
    directory: epath.PathLike,
    target: PyTree,
    *,
    before_step: int | None = None,
    config: dict[str, Any] | None = None,
    manager: CheckpointManager | None = None,
    renames: Sequence[Rename] | None = None,
) -> RestoredCheckpoint | None:
    """The newest readable checkpoint of ``directory`` (of a step below ``before_step``, if given),
    restored into ``target``'s shapes and shardings, or None when there is none.

    Unreadable checkpoints are fallen back past and moved into ``directory/corrupt/``, so that
    their steps are written anew; see ``restore_checkpoint`` for ``config``, ``manager`` and ``renames``.
    """
    # Every step directory, complete or not: one damaged so far as to have lost an item is
    # fallen back past (and set aside) like any unreadable one, so that its step is written anew.
    directory = storage_path(directory)
    forget_listings(directory)
    names = [path.name for path in directory.iterdir() if path.name.isdigit()] if directory.is_dir() else []
    if is_remote(directory):
        # Written in place there: a step without its commit file is a write that never finished
        # (orbax deletes it when it next opens the directory), not a damaged checkpoint.
        names = [name for name in names if is_committed(directory / name)]
    steps = sorted((int(name) for name in names), reverse=True)
    steps = [step for step in steps if before_step is None or step < before_step]
    if not steps:
        return None
    return restore_checkpoint(directory, steps, target, fall_back=True, config=config, manager=manager, renames=renames)


def restore_checkpoint(
    directory: epath.PathLike,
    steps: list[int],
    target: PyTree,
    *,
    fall_back: bool,
    config: dict[str, Any] | None = None,
    manager: CheckpointManager | None = None,
    renames: Sequence[Rename] | None = None,
) -> RestoredCheckpoint:
    """Reads the first readable checkpoint of ``steps`` into ``target``'s shapes and shardings.

    Args:
        directory: The checkpoints directory.
        steps: The candidate steps, in the order to try them (newest first).
        target: Arrays (or ``jax.ShapeDtypeStruct``s) of the tree to restore: their shapes,
            dtypes and shardings, under the current mesh, whatever mesh the checkpoint was saved under.
        fall_back: Pass over an unreadable checkpoint (moved into ``directory/corrupt/`` once an
            older one was read, saying so on stderr); otherwise its error is raised.
        config: The current config as plain values: a checkpoint that does not fit ``target``
            is then explained by the config values that changed since it was saved.
        manager: The manager writing into ``directory``, told of checkpoints set aside.
        renames: How the target's arrays were once named (``xax.checkpoint.renames``): a checkpoint
            whose names differ from the target's by these alone is read under its old names. None
            takes those the target's modules declare (``legacy_renames``).

    Raises:
        CheckpointMismatchError: When a checkpoint holds other arrays than ``target`` (this stops
            the search: an older one would not fit either).
        CheckpointError: When no candidate is readable, naming the last one's file at fault.
    """
    directory = storage_path(directory)
    unreadable: list[tuple[int, CheckpointError]] = []
    renames = legacy_renames(target) if renames is None else tuple(renames)
    for step in steps:
        try:
            tree, metadata = _load_matching(directory, step, target, config, renames)
        except CheckpointMismatchError:
            raise
        except CheckpointError as error:
            if not fall_back or step == steps[-1]:
                raise
            unreadable.append((step, error))
            continue
        _set_aside(directory, unreadable, manager)
        return RestoredCheckpoint(tree, step, directory / str(step), metadata)
    raise AssertionError("unreachable: the last step raises")


def _load_matching(
    directory: epath.Path, step: int, target: PyTree, config: dict[str, Any] | None, renames: Sequence[Rename] = ()
) -> tuple[PyTree, dict[str, Any]]:
    # Compare the saved arrays with the target's first (no data read), so that a changed config
    # names the arrays and the keys, not an orbax internal, and is not taken for corruption.
    step_dir = directory / str(step)
    saved = saved_array_metadata(directory, step)
    differences = tree_differences(target, saved) if saved is not None else []
    if differences:
        plan = plan_renames(named_leaves(target), named_leaves(saved), renames) if renames else None
        if plan is None:
            _mismatch(step_dir, differences, config)
        return _load_renamed(directory, step, target, saved, plan)
    try:
        return load_checkpoint(directory, step, abstract_like(target))
    except CheckpointMismatchError as error:
        _mismatch(step_dir, [one_line(error).split(" than this run's at ", 1)[-1] + " differ"], config)


def _load_renamed(
    directory: epath.Path, step: int, target: PyTree, saved: PyTree, plan: RenamePlan
) -> tuple[PyTree, dict[str, Any]]:
    """Reads a checkpoint whose arrays are the target's under their old names: each saved array
    in the target's dtype and sharding (a transposed one with its partition reversed), then placed
    under its new name."""
    wanted = named_leaves(abstract_like(target))
    new_name = {old: new for new, old in plan.saved_name.items()}

    def saved_target(key_path: Any, leaf: Any) -> jax.ShapeDtypeStruct:
        new = new_name[path_name(key_path)]
        like = wanted[new]
        if plan.transform[new] is not None:
            sharding = transposed_sharding(like.sharding, len(leaf.shape))
            return jax.ShapeDtypeStruct(tuple(leaf.shape), like.dtype, sharding=sharding)
        return jax.ShapeDtypeStruct(like.shape, like.dtype, sharding=like.sharding)

    is_array = lambda leaf: hasattr(leaf, "shape") and hasattr(leaf, "dtype")  # noqa: E731
    tree, metadata = load_checkpoint(
        directory, step, jax.tree_util.tree_map_with_path(saved_target, saved, is_leaf=is_array)
    )
    found = named_leaves(tree)

    def place(key_path: Any, leaf: Any) -> Any:
        new = path_name(key_path)
        return renamed_leaf(found[plan.saved_name[new]], plan.transform[new], leaf)

    return jax.tree_util.tree_map_with_path(place, target), metadata


def _mismatch(step_dir: epath.Path, differences: list[str], config: dict[str, Any] | None) -> NoReturn:
    drift: list[str] = []
    if config is not None:
        try:
            drift = config_drift(read_metadata(step_dir.parent, int(step_dir.name)).get("config", {}), config)
        except CheckpointError:
            drift = []
    shown = "; ".join(differences[:2]) + (f" (and {len(differences) - 2} more)" if len(differences) > 2 else "")
    if drift:
        cause = f"config changed since it was saved: {'; '.join(drift)} (if none of these explains it, the code did)"
    elif config is not None:
        cause = "the config is the same, so the model or optimizer code changed"
    else:
        cause = "the restore target is not the tree that was saved"
    if any(difference.startswith("parameter ") for difference in differences):
        advice = "to resume it, run with the checkpoint's config values"  # warm_start needs the shapes too
    else:
        advice = (
            f"to take its weights only, start a new run directory with warm_start={step_dir}; to resume it, "
            "run with the checkpoint's config values"
        )
    raise CheckpointMismatchError(
        f"checkpoint {step_dir} does not fit this run's model and optimizer: {shown}; {cause}; {advice}"
    )


def _set_aside(
    directory: epath.Path, unreadable: list[tuple[int, CheckpointError]], manager: CheckpointManager | None
) -> None:
    """Moves the checkpoints a restore fell back past out of the way, saying so (one line each)."""
    if not unreadable:
        return
    for step, error in unreadable:
        step_dir = directory / str(step)
        moved = _move_aside(step_dir) if jax.process_index() == 0 else None
        where = f"; moved it to {moved}" if moved is not None else ""
        tell(f"fell back past {step_dir} ({why_unreadable(error)}){where}")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("xax_checkpoints_set_aside")
    if manager is not None:
        manager.reload()


def why_unreadable(error: CheckpointError) -> str:
    """A short clause saying why a checkpoint could not be read."""
    if isinstance(error, CorruptCheckpointError):
        name = re.search(r"array (\S+) does not match", str(error))
        return f"array {name.group(1) if name else '?'} does not match its checksum"
    text = one_line(root_cause(error))
    array = re.search(r'Error reading "([^"]+?)/[^"/]*"', text)
    files = [Path(path) for path in re.findall(r'local file "([^"]+)"', text)]
    data_files = [path.name for path in files if path.parent.name == "d"]
    if "is not valid for value of size" in text or "OUT_OF_RANGE" in text:
        if data_files:
            return f"data file {data_files[-1]} is truncated"
        return f"the data of {array.group(1)} is truncated" if array else "a data file is truncated"
    if "DATA_LOSS" in text or "checksum" in text.lower():
        return f"data file {data_files[-1]} is corrupt" if data_files else "a data file is corrupt"
    lowered = text.lower()
    if "not found" in lowered or "no such file" in lowered or "does not exist" in lowered:
        return "a file is missing"
    if "JSONDecodeError" in text or "Expecting" in text:
        return "its metadata is not valid JSON"
    return text[:120]


def _move_aside(step_dir: epath.Path) -> epath.Path | None:
    """Moves an unreadable checkpoint into ``checkpoints/corrupt/`` (the step may then be written
    anew); returns where it went, or None when it could not be moved."""
    corrupt = step_dir.parent / CORRUPT_DIR
    destination = corrupt / step_dir.name
    suffix = 1
    while destination.exists():
        destination, suffix = corrupt / f"{step_dir.name}.{suffix}", suffix + 1
    try:
        if is_remote(step_dir):
            # An object store has no folders to rename: each object is copied, then all deleted.
            fs, source = filesystem(step_dir)
            target = filesystem(destination)[1]
            objects = fs.find(source)
            fs.copy(objects, [target + name.removeprefix(source) for name in objects])
            fs.rm(source, recursive=True)
        else:
            corrupt.mkdir(exist_ok=True)
            step_dir.rename(destination)
    except OSError:
        return None
    return destination
