"""The ``xax`` console command: ``xax ckpt inspect PATH``, ``xax ckpt diff A B``, ``xax runs diff A B``,
``xax plan MODULE:CLASS`` and ``xax repeat``.

Checkpoints are read through orbax metadata, orbax array restores and JSON only: nothing in a
checkpoint is unpickled or executed, and the model class is never needed.
"""

import argparse
import importlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from etils import epath
from jaxtyping import Shaped
from orbax.checkpoint import metadata as ocp_metadata

from xax.checkpoint import (
    ClosedLoopFilter,
    disk_size,
    flatten_dict,
    load_arrays_anywhere,
    named_leaves,
    one_line,
    quiet_orbax,
    read_checksums,
    resolve_checkpoint,
)
from xax.checkpoint.remote import prepare_orbax
from xax.core.errors import CheckpointError, ConfigError, XaxError
from xax.task.runs import DEFAULT_RTOL, diff_runs
from xax.utils.storage import storage_path
from xax.utils.text import human_bytes

# Kept under the names this module has always used.
_ClosedLoopFilter = ClosedLoopFilter
_one_line = one_line

# The TrainState fields in their saved order; a checkpoint's other top-level entries follow them.
GROUPS = ("params", "frozen", "opt_state", "ema", "key")
# Metadata sections shown under their own titles; the config and the remaining entries follow.
META_SECTIONS = (("state", "State"), ("cursor", "Data cursor"), ("valid_metrics", "Validation metrics"))
EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2


@dataclass(frozen=True)
class Leaf:
    """Shape and dtype of one saved array."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def describe(self) -> str:
        return f"{self.shape} {self.dtype}"


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint as read from disk, before any array is loaded.

    Attributes:
        directory: The checkpoints directory holding the step directory.
        step: The step (the step directory's name).
        tree: The saved tree of orbax array metadata (None where a TrainState field is empty).
        leaves: Shape and dtype of every saved array, by dotted name.
        meta: The JSON metadata saved next to the arrays.
        checksums: The checksums recorded with the arrays (None for a checkpoint saved without).
    """

    directory: epath.Path
    step: int
    tree: Any
    leaves: dict[str, Leaf]
    meta: dict[str, Any]
    checksums: dict[str, Any] | None = None

    @property
    def path(self) -> epath.Path:
        return self.directory / str(self.step)


def open_checkpoint(path: epath.PathLike) -> Checkpoint:
    """Reads the metadata of the checkpoint at ``path`` (a step, checkpoints or run directory).

    Args:
        path: A step directory, a checkpoints directory, or a run directory (its newest step).

    Returns:
        The checkpoint's array shapes and dtypes and its JSON metadata; no array is read.

    Raises:
        CheckpointError: Naming the file that is missing or unreadable.
    """
    path = storage_path(path)
    prepare_orbax(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run directory, a checkpoints directory or a step")
    directory, steps = resolve_checkpoint(path)
    step_dir = directory / str(steps[0])
    with quiet_orbax():
        try:
            tree = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir / "state")).tree
        except Exception as error:
            raise CheckpointError(f"{step_dir / 'state'} is unreadable ({type(error).__name__}: {error})") from error
        try:
            meta = dict(ocp.JsonCheckpointHandler().restore(epath.Path(step_dir / "meta")))
        except Exception as error:
            raise CheckpointError(f"{step_dir / 'meta'} is unreadable ({type(error).__name__}: {error})") from error
    if "state" not in meta:
        raise CheckpointError(f"{step_dir / 'meta'} has no 'state' entry; it is not an xax checkpoint")
    checksums = read_checksums(step_dir)
    leaves = {}
    for name, leaf in named_leaves(tree).items():
        if not isinstance(leaf, ocp_metadata.ArrayMetadata):
            raise CheckpointError(f"{step_dir / 'state'} holds a {type(leaf).__name__} at {name}; expected arrays only")
        leaves[name] = Leaf(tuple(int(n) for n in leaf.shape), np.dtype(leaf.dtype))
    return Checkpoint(directory, steps[0], tree, leaves, meta, checksums)


def read_arrays(checkpoint: Checkpoint) -> dict[str, np.ndarray]:
    """Reads every array of ``checkpoint`` into host memory, whatever mesh it was saved under, and
    verifies each against the checksum recorded with it.

    Raises:
        CheckpointError: Naming the checkpoint when an array file is truncated or corrupt, or naming
            the array that does not match its checksum.
    """
    device = jax.sharding.make_single_device_sharding(jax.devices("cpu")[0])
    with quiet_orbax():
        tree = load_arrays_anywhere(checkpoint.directory, checkpoint.step, device)
    return {name: np.asarray(value) for name, value in named_leaves(tree).items()}


def leaf_difference(a: Shaped[np.ndarray, "*shape"], b: Shaped[np.ndarray, "*shape"]) -> tuple[float, float]:
    """How far ``b`` is from ``a``, computed in float64.

    Returns:
        ``(max |b - a|, ||b - a||_2 / ||a||_2)``; the relative difference is ``inf`` when ``a`` is
        zero and ``b`` is not, and both are NaN when one holds a NaN the other does not.
    """
    wide = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(b) else np.float64
    delta = b.astype(wide) - a.astype(wide)
    if delta.size == 0:
        return 0.0, 0.0
    max_abs = float(np.max(np.abs(delta)))
    reference, distance = float(np.linalg.norm(a.astype(wide).ravel())), float(np.linalg.norm(delta.ravel()))
    if reference == 0.0:
        return max_abs, 0.0 if distance == 0.0 else math.inf
    return max_abs, distance / reference


def _rows(pairs: Sequence[tuple[str, str]], indent: int = 2) -> list[str]:
    width = max((len(key) for key, _ in pairs), default=0)
    return [f"{' ' * indent}{key.ljust(width)}  {value}".rstrip() for key, value in pairs]


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}" if number == 1 else f"{number:,} {noun}s"


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _mesh(mesh: dict[str, Any] | None) -> str:
    if not mesh:
        return "none"
    return " x ".join(f"{name}={size}" for name, size in zip(mesh.get("axis_names", []), mesh.get("shape", [])))


def _group_order(names: Sequence[str]) -> list[str]:
    found = {name.split(".", 1)[0] for name in names}
    return list(GROUPS) + sorted(found - set(GROUPS))


def _array_lines(leaves: dict[str, Leaf]) -> list[str]:
    total_size, total_bytes = sum(leaf.size for leaf in leaves.values()), sum(leaf.nbytes for leaf in leaves.values())
    lines = [f"Arrays: {_count(len(leaves), 'array')}, {_count(total_size, 'parameter')}, {human_bytes(total_bytes)}"]
    name_width = max((len(name) for name in leaves), default=0)
    shape_width = max((len(str(leaf.shape)) for leaf in leaves.values()), default=0)
    for group in _group_order(list(leaves)):
        members = {name: leaf for name, leaf in leaves.items() if name.split(".", 1)[0] == group}
        if not members:
            lines.append(f"  {group}: empty")
            continue
        size, nbytes = sum(leaf.size for leaf in members.values()), sum(leaf.nbytes for leaf in members.values())
        lines.append(f"  {group}: {_count(len(members), 'array')}, {_count(size, 'parameter')}, {human_bytes(nbytes)}")
        for name, leaf in members.items():
            lines.append(f"    {name.ljust(name_width)}  {str(leaf.shape).ljust(shape_width)}  {leaf.dtype}")
    return lines


def _checksums_row(checkpoint: Checkpoint) -> str:
    if checkpoint.checksums is None:
        return "none (saved without checksums)"
    return f"{_count(len(checkpoint.checksums.get('arrays', {})), 'array')} ({checkpoint.checksums.get('algorithm')})"


def inspect_lines(checkpoint: Checkpoint) -> list[str]:
    """The report ``xax ckpt inspect`` prints: metadata, counters, arrays and config."""
    meta, size = checkpoint.meta, disk_size(checkpoint.path)
    lines = [f"Checkpoint {checkpoint.path}"]
    lines += _rows(
        [
            ("step", str(checkpoint.step)),
            ("format", _show(meta.get("format"))),
            ("xax version", _show(meta.get("xax_version", "unknown"))),
            ("git commit", _show(meta.get("git_commit") or "unknown")),
            ("mesh", _mesh(meta.get("mesh"))),
            ("size on disk", f"{human_bytes(size)} ({size:,} bytes)"),
            ("checksums", _checksums_row(checkpoint)),
        ]
    )
    for key, title in META_SECTIONS:
        section = meta.get(key) or {}
        lines.append(title)
        lines += _rows([(name, _show(value)) for name, value in section.items()]) if section else ["  none"]
    lines += _array_lines(checkpoint.leaves)
    lines.append("Config")
    config_yaml = yaml.safe_dump(meta.get("config", {}), sort_keys=False).rstrip("\n")
    lines += [f"  {line}" for line in config_yaml.splitlines()]
    return lines


def _array_diff_lines(a: Checkpoint, b: Checkpoint) -> list[str]:
    common = [name for name in a.leaves if name in b.leaves]
    changed = [name for name in common if a.leaves[name] != b.leaves[name]]
    comparable = [name for name in common if name not in changed]
    values_a, values_b = (read_arrays(a), read_arrays(b)) if comparable else ({}, {})
    rows = []
    for name in comparable:
        x, y = values_a[name], values_b[name]
        if np.ascontiguousarray(x).tobytes() != np.ascontiguousarray(y).tobytes():
            max_abs, relative = leaf_difference(x, y)
            rows.append((name, f"{max_abs:.6g}", f"{relative:.6g}"))
    lines = []
    if rows:
        lines.append(f"Arrays that differ: {len(rows)} of {len(comparable)}")
        width = [max(len(row[i]) for row in [("name", "max abs diff", "rel L2 diff"), *rows]) for i in range(3)]
        for row in [("name", "max abs diff", "rel L2 diff"), *rows]:
            lines.append(f"  {row[0].ljust(width[0])}  {row[1].rjust(width[1])}  {row[2].rjust(width[2])}")
    for title, names in (
        ("Only in A", [n for n in a.leaves if n not in b.leaves]),
        ("Only in B", [n for n in b.leaves if n not in a.leaves]),
    ):
        if names:
            lines.append(title)
            lines += _rows([(name, (a.leaves.get(name) or b.leaves[name]).describe()) for name in names])
    if changed:
        lines.append("Shape or dtype changed")
        lines += _rows([(name, f"{a.leaves[name].describe()} -> {b.leaves[name].describe()}") for name in changed])
    return lines


def _dict_diff_lines(title: str, a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    flat_a, flat_b = flatten_dict(a), flatten_dict(b)
    missing = object()
    pairs = []
    for key in [*flat_a, *(key for key in flat_b if key not in flat_a)]:
        old, new = flat_a.get(key, missing), flat_b.get(key, missing)
        if old != new:
            shown = ["(absent)" if value is missing else _show(value) for value in (old, new)]
            pairs.append((key, f"{shown[0]} -> {shown[1]}"))
    return [title, *_rows(pairs)] if pairs else []


def diff_lines(a: Checkpoint, b: Checkpoint, *, arrays_only: bool = False) -> list[str]:
    """The report ``xax ckpt diff`` prints; empty when the checkpoints are identical.

    Arrays count as identical only when bitwise equal. For arrays that differ it gives the largest
    absolute difference and the relative L2 difference ``||b - a||_2 / ||a||_2`` (A is the
    reference); with ``arrays_only`` the counters, data cursor, config and metadata are not compared.
    """
    lines = _array_diff_lines(a, b)
    if not arrays_only:
        sections = {key for key, _ in META_SECTIONS} | {"config"}
        for key, title in (*META_SECTIONS, ("config", "Config")):
            lines += _dict_diff_lines(title, a.meta.get(key) or {}, b.meta.get(key) or {})
        other_a = {key: value for key, value in a.meta.items() if key not in sections}
        other_b = {key: value for key, value in b.meta.items() if key not in sections}
        lines += _dict_diff_lines("Metadata", other_a, other_b)
    if not lines:
        return []
    return [f"A: {a.path} (step {a.step})", f"B: {b.path} (step {b.step})", *lines]


def _inspect_command(args: argparse.Namespace) -> int:
    checkpoint = open_checkpoint(args.path)
    lines = inspect_lines(checkpoint)
    if args.verify:
        arrays = read_arrays(checkpoint)
        checked = "" if checkpoint.checksums is None else ", each matching its checksum"
        lines.append(f"Verified: {_count(len(arrays), 'array')} read back{checked}")
    print("\n".join(lines))
    return EXIT_OK


def _diff_command(args: argparse.Namespace) -> int:
    lines = diff_lines(open_checkpoint(args.a), open_checkpoint(args.b), arrays_only=args.arrays_only)
    if lines:
        print("\n".join(lines))
    return EXIT_DIFFERENT if lines else EXIT_OK


def _runs_diff_command(args: argparse.Namespace) -> int:
    if not args.rtol >= 0:
        raise ConfigError(f"--rtol {args.rtol} must be a number >= 0, e.g. --rtol 1e-6")
    lines, differ = diff_runs(args.a, args.b, rtol=args.rtol)
    print("\n".join(lines))
    return EXIT_DIFFERENT if differ else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The ``xax`` argument parser, one subcommand per tool."""
    parser = argparse.ArgumentParser(prog="xax", description="Tools for xax runs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ckpt = commands.add_parser("ckpt", help="Inspect and compare checkpoints", description="Checkpoint tools.")
    actions = ckpt.add_subparsers(dest="action", required=True, metavar="ACTION")
    path_help = "a step directory, a checkpoints directory, or a run directory (its newest checkpoint)"

    inspect = actions.add_parser(
        "inspect",
        help="Print a checkpoint's step, counters, config, array shapes and size",
        description="Print a checkpoint's step, counters, data cursor, version, mesh, config, arrays and size.",
    )
    inspect.add_argument("path", metavar="PATH", type=storage_path, help=path_help)
    inspect.add_argument(
        "--verify",
        action="store_true",
        help="also read every array and check it against its recorded checksum, to catch corrupt data files",
    )
    inspect.set_defaults(run=_inspect_command)

    diff = actions.add_parser(
        "diff",
        help="Compare two checkpoints (exit 0: identical, 1: different, 2: error)",
        description="Compare two checkpoints: arrays, counters, data cursor, config and metadata. "
        "Exit code 0 if identical, 1 if they differ, 2 on errors.",
    )
    diff.add_argument("a", metavar="A", type=storage_path, help=f"the reference checkpoint: {path_help}")
    diff.add_argument("b", metavar="B", type=storage_path, help="the checkpoint compared with it")
    diff.add_argument("--arrays-only", action="store_true", help="compare only the arrays")
    diff.set_defaults(run=_diff_command)

    runs = commands.add_parser("runs", help="Compare runs", description="Run tools.")
    run_actions = runs.add_subparsers(dest="action", required=True, metavar="ACTION")
    runs_diff = run_actions.add_parser(
        "diff",
        help="Compare two runs' provenance and metric curves (exit 0: same, 1: different, 2: error)",
        description="Compare two runs: what differs in their provenance.json, most likely to change the "
        "numbers first (1 compiled step, 2 data, 3 versions/backend/devices/flags/environment, 4 config, 5 git), "
        "then each logged metric's curve: the first step where they differ and the final values. "
        "Exit code 0 if the same, 1 if they differ, 2 on errors.",
    )
    runs_diff.add_argument("a", metavar="A", type=storage_path, help="the reference run directory (or URL)")
    runs_diff.add_argument("b", metavar="B", type=storage_path, help="the run directory compared with it")
    runs_diff.add_argument(
        "--rtol",
        type=float,
        default=DEFAULT_RTOL,
        help=f"logged values a, b are the same when |a - b| <= rtol * max(|a|, |b|) (default {DEFAULT_RTOL:g})",
    )
    runs_diff.set_defaults(run=_runs_diff_command)

    plan = commands.add_parser(
        "plan",
        help="Print a task's parallel plan: memory per device and FLOPs, before training",
        description="Build a task's train state and training step abstractly (nothing is allocated) and print "
        "the plan's memory per device, XLA's memory analysis of the compiled step and its FLOPs. "
        "Example: xax plan examples.shakespeare:Shakespeare parallel.plan=fsdp launcher.kind=multi_cpu "
        "launcher.num_cpu_devices=8",
    )
    plan.add_argument("task", metavar="MODULE:CLASS", help="the task class, e.g. examples.mnist:MnistClassification")
    plan.add_argument(
        "overrides", metavar="KEY=VALUE", nargs="*", help="config overrides, as on the task's command line"
    )
    plan.add_argument("--no-compile", action="store_true", help="skip compiling the step (shardings only)")
    plan.set_defaults(run=_plan_command)

    repeat = commands.add_parser(
        "repeat",
        help="Run one config over several seeds; each final metric as mean ± 95%% interval",
        description="Run a task once per seed (one run after another, each in ROOT/seed_<s>), then print each "
        "final train/valid metric as the mean over seeds ± the half-width of its 95% Student t interval, "
        "and write the table as ROOT/repeat.json. Example: xax repeat 5 examples.mnist:MnistClassification "
        "max_steps=500 --compare optim.lr=1e-3",
    )
    repeat.add_argument(
        "spec",
        metavar="[N] MODULE:CLASS [KEY=VALUE ...]",
        nargs="+",
        help="how many seeds (0 .. N-1; or --seeds), the task class and config overrides as on its command line",
    )
    repeat.add_argument("--seeds", help="the seeds, comma-separated (e.g. 0,1,2), instead of N")
    repeat.add_argument(
        "--compare",
        metavar="[MODULE:CLASS] KEY=VALUE",
        nargs="+",
        help="a second config, run over the same seeds: the first with these overrides on top (and another task "
        "class, if given); the table notes per metric whether the two intervals overlap",
    )
    repeat.add_argument("--root", help="folder of the runs (default: runs/repeat/<CLASS>-<time>)")
    repeat.add_argument(
        "--jobs",
        default="1",
        help="runs at once, each in a process of its own pinned to one GPU (at most one per GPU); auto: one per "
        "GPU; 1 (default): one after another in this process",
    )
    repeat.set_defaults(run=_repeat_command)
    return parser


def load_task_class(spec: str) -> type:
    """The class named by ``module:Class`` (the module is imported).

    Raises:
        ConfigError: When the spec is malformed, the module cannot be imported or has no such class.
    """
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"task {spec!r} is not MODULE:CLASS; e.g. examples.mnist:MnistClassification")
    if os.getcwd() not in sys.path:  # a console script does not look in the working directory
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"task {spec!r}: cannot import {module_name} ({error})") from error
    task_class = getattr(module, class_name, None)
    if not isinstance(task_class, type):
        raise ConfigError(f"task {spec!r}: {module_name} has no class {class_name}")
    return task_class


def _plan_command(args: argparse.Namespace) -> int:
    from xax.core.config_io import parse_cli
    from xax.task.launchers import get_launcher
    from xax.task.task import Task

    task_class = load_task_class(args.task)
    if not issubclass(task_class, Task):
        raise ConfigError(f"task {args.task!r} is not a training task (an xax.Task subclass)")
    config = parse_cli(task_class.get_config_class(), None, list(args.overrides))
    placement = get_launcher(config.launcher).place()
    task = task_class(config)
    task.placement = placement
    print("\n".join(task.plan_report(compile_step=not args.no_compile).lines()))
    return EXIT_OK


def _repeat_command(args: argparse.Namespace) -> int:
    import pathlib

    from xax.task.repeat import Arm, default_root, repeat, resolve_jobs, visible_gpus
    from xax.task.task import Task

    def task(spec: str) -> type[Task]:
        task_class = load_task_class(spec)
        if not issubclass(task_class, Task):
            raise ConfigError(f"task {spec!r} is not a training task (an xax.Task subclass)")
        return task_class

    spec = list(args.spec)
    count = int(spec.pop(0)) if spec and spec[0].isdigit() else None
    if (count is None) == (args.seeds is None):
        raise ConfigError("give the number of seeds (xax repeat N MODULE:CLASS ...) or --seeds, exactly one")
    try:
        seeds = list(range(count)) if count is not None else [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    if not spec:
        raise ConfigError(
            "name the task after the number of seeds: MODULE:CLASS, e.g. examples.mnist:MnistClassification"
        )
    task_class = task(spec[0])
    arms = [Arm("a" if args.compare else "runs", task_class, tuple(spec[1:]))]
    if args.compare:
        other = list(args.compare)
        other_class = task(other.pop(0)) if "=" not in other[0] else task_class
        # The second config is the first with these overrides on top (later ones win).
        arms = [Arm("a", task_class, tuple(spec[1:])), Arm("b", other_class, (*spec[1:], *other))]
    gpus = visible_gpus() if args.jobs != "1" else []
    jobs = resolve_jobs(args.jobs, gpus)
    root = pathlib.Path(args.root) if args.root is not None else default_root(task_class)
    lines, _ = repeat(arms, seeds, root, jobs, gpus)
    for arm in arms:
        shown = " ".join(arm.overrides) or "(defaults)"
        print(f"{arm.label}: {arm.task_class.__module__}:{arm.task_class.__qualname__} {shown}")
    print("\n".join(lines))
    print(f"written: {root / 'repeat.json'}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``xax`` command.

    Args:
        argv: The arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success (for ``diff``: identical), 1 when ``diff`` finds differences,
        2 on errors, with one line on stderr naming the file at fault.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        return EXIT_ERROR if exit_request.code else EXIT_OK
    previous_hook = sys.unraisablehook
    if not isinstance(previous_hook, _ClosedLoopFilter):
        sys.unraisablehook = _ClosedLoopFilter(previous_hook)
    try:
        code = args.run(args)
    except (XaxError, OSError) as error:
        # The filter stays: reads still in flight when this one failed finish after we return.
        print(f"xax: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    sys.unraisablehook = previous_hook
    return code


if __name__ == "__main__":
    sys.exit(main())
