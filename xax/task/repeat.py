"""Repeats of one config over several seeds, and each final metric as a mean with a 95% interval.

``xax repeat N MODULE:Task [key=value ...]`` (``xax/cli.py``) runs the task once per seed, one run after
another in this process (or ``--jobs`` at once, each in a process of its own pinned to one GPU), each in
its own run directory, then reads each run's last logged train and
valid metrics (``read_history``) and reports, per metric, the mean over seeds with the half-width of
the 95% Student t interval of that mean. ``--compare`` runs a second config the same way and notes,
per metric, whether the two intervals overlap.
"""

import datetime
import json
import math
import os
import queue
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import scipy.stats

from xax.core.errors import ConfigError, XaxError
from xax.task.loggers.jsonl import read_history
from xax.task.loggers.sections import dashboard_tag
from xax.task.task import Task

# Overrides the repeat sets itself, per run.
OWN_KEYS = ("seed", "artifacts.run_dir")


class RepeatError(XaxError):
    """A run of the repeat ended with an error (its own message was printed above)."""


@dataclass(frozen=True)
class Interval:
    """The mean of a metric over seeds and the half-width of its 95% confidence interval.

    Attributes:
        mean: The mean over the seeds.
        half_width: ``t_{0.975, n-1} s / sqrt(n)``, with ``s`` the sample standard deviation (n - 1 in
            its denominator); NaN for one value.
        n: The number of values.
        values: The values, in seed order.
    """

    mean: float
    half_width: float
    n: int
    values: tuple[float, ...]

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def overlaps(self, other: "Interval") -> bool:
        return self.low <= other.high and other.low <= self.high


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of ``values`` and the half-width of the Student t confidence interval of that mean.

    The half-width is ``t s / sqrt(n)`` with ``t`` the ``(1 + confidence) / 2`` quantile of Student's t
    with ``n - 1`` degrees of freedom and ``s`` the sample standard deviation (Student 1908).

    Examples:
        >>> interval = t_interval([1.0, 2.0, 3.0])
        >>> interval.mean, round(interval.half_width, 4)  # t(0.975, 2) = 4.3027, s = 1
        (2.0, 2.4841)
    """
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean, math.nan, n, tuple(values))
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    quantile = float(scipy.stats.t.ppf((1.0 + confidence) / 2.0, n - 1))
    return Interval(mean, quantile * std / math.sqrt(n), n, tuple(values))


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of each of the task's metrics, as ``train/<name>`` and ``valid/<name>``.

    The framework's own measurements (throughput, timers, host and device use) are left out: they
    measure the machine, not the result.
    """
    final: dict[str, float] = {}
    for record in read_history(run_dir):
        for name, value in record["scalars"].items():
            if dashboard_tag(name) == name and isinstance(value, int | float):
                final[f"{record['phase']}/{name}"] = float(value)
    return final


@dataclass(frozen=True)
class Arm:
    """One config of a repeat: a label, the task class and its overrides."""

    label: str
    task_class: type[Task]
    overrides: tuple[str, ...]


def check_overrides(overrides: Sequence[str]) -> None:
    for override in overrides:
        key = override.partition("=")[0].strip()
        if key in OWN_KEYS:
            raise ConfigError(f"{override!r}: xax repeat sets {key} itself for each run; leave it out")


def visible_gpus() -> list[str]:
    """The GPUs a run can be pinned to, as ``CUDA_VISIBLE_DEVICES`` entries (that variable's own list
    when set); empty on a machine without NVIDIA GPUs. Asks NVML, so JAX is not started here."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [entry.strip() for entry in visible.split(",") if entry.strip() and entry.strip() != "-1"]
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(index) for index in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver or no library (pynvml.NVMLError, OSError): no GPU to pin to
        return []


def resolve_jobs(jobs: str, gpus: Sequence[str]) -> int:
    """How many runs go at once for ``--jobs`` (``auto``: one per GPU).

    Raises:
        ConfigError: For ``auto`` without a GPU, a count below 1, or more runs at once than GPUs (two
            JAX processes on one GPU each take most of its memory).
    """
    if jobs == "auto":
        if not gpus:
            raise ConfigError("--jobs auto runs one seed per GPU and found no GPU; give --jobs N to run N at once")
        return len(gpus)
    try:
        count = int(jobs)
    except ValueError:
        raise ConfigError(f"--jobs {jobs!r}: give a number of runs at once, or auto (one per GPU)") from None
    if count < 1:
        raise ConfigError(f"--jobs {count}: give at least 1")
    if gpus and count > len(gpus):
        raise ConfigError(f"--jobs {count} with {len(gpus)} GPUs: one run per GPU, so give --jobs {len(gpus)} or fewer")
    return count


def task_spec(task_class: type) -> str:
    """``module:Class`` for a process of its own to import the task from."""
    if task_class.__module__ == "__main__" or "<locals>" in task_class.__qualname__:
        raise ConfigError(
            f"{task_class.__qualname__} is not importable by name ({task_class.__module__}); "
            "--jobs runs each seed in a process of its own: define the task in a module"
        )
    return f"{task_class.__module__}:{task_class.__qualname__}"


# What a run's own process does: import the task and launch it (its exit code is the run's).
CHILD = "import sys; from xax.cli import load_task_class; load_task_class(sys.argv[1]).launch(None, argv=sys.argv[2:])"


def _run_in_process(arm: Arm, seed: int, run_dir: Path) -> None:
    argv = [*arm.overrides, f"seed={seed}", f"artifacts.run_dir={run_dir}"]
    try:
        arm.task_class.launch(None, argv=argv)
    except SystemExit as exit_request:
        if exit_request.code:
            raise RepeatError(
                f"{arm.label}: the run of seed {seed} ended with exit code {exit_request.code} ({run_dir})"
            ) from None


def _run_in_processes(arm: Arm, seeds: Sequence[int], root: Path, jobs: int, gpus: Sequence[str]) -> None:
    """Runs the seeds ``jobs`` at once, each in a process of its own (pinned to a free GPU when there
    are GPUs), its console output in ``root/seed_<s>.log``."""
    spec = task_spec(arm.task_class)
    free: queue.Queue[str | None] = queue.Queue()
    for slot in range(jobs):
        free.put(gpus[slot] if gpus else None)
    root.mkdir(parents=True, exist_ok=True)

    def run(seed: int) -> tuple[int, int, Path]:
        gpu = free.get()
        try:
            env = dict(os.environ)
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            run_dir, log = root / f"seed_{seed}", root / f"seed_{seed}.log"
            argv = [*arm.overrides, f"seed={seed}", f"artifacts.run_dir={run_dir}"]
            where = "" if gpu is None else f" on GPU {gpu}"
            print(f"{arm.label}: seed {seed}{where} started (output: {log})", flush=True)
            start = time.monotonic()
            with log.open("w", encoding="utf-8") as out:
                code = subprocess.run(
                    [sys.executable, "-c", CHILD, spec, *argv], env=env, stdout=out, stderr=subprocess.STDOUT
                ).returncode
            print(
                f"{arm.label}: seed {seed} ended (exit code {code}) after {time.monotonic() - start:.0f} s", flush=True
            )
            return seed, code, log
        finally:
            free.put(gpu)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        outcomes = list(pool.map(run, seeds))
    failed = [(seed, code, log) for seed, code, log in outcomes if code != 0]
    if failed:
        seed, code, log = failed[0]
        raise RepeatError(f"{arm.label}: the run of seed {seed} ended with exit code {code}; its output: {log}")


def run_arm(arm: Arm, seeds: Sequence[int], root: Path, jobs: int = 1, gpus: Sequence[str] = ()) -> dict[str, Interval]:
    """Runs ``arm`` once per seed under ``root/seed_<s>`` (``jobs`` at once, each in its own process,
    when above 1) and returns each final metric's interval."""
    check_overrides(arm.overrides)
    if jobs > 1:
        _run_in_processes(arm, seeds, root, jobs, gpus)
    else:
        for seed in seeds:
            _run_in_process(arm, seed, root / f"seed_{seed}")
    per_seed = [final_metrics(root / f"seed_{seed}") for seed in seeds]
    names = sorted(set().union(*per_seed))
    return {
        name: t_interval([metrics[name] for metrics in per_seed if name in metrics])
        for name in names
        if all(name in metrics for metrics in per_seed)
    }


def default_root(task_class: type) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / "repeat" / f"{task_class.__name__}-{stamp}"


def _cell(interval: Interval) -> str:
    if math.isnan(interval.half_width):
        return f"{interval.mean:.6g}"
    return f"{interval.mean:.6g} ± {interval.half_width:.3g}"


def table_lines(results: dict[str, dict[str, Interval]], seeds: Sequence[int]) -> list[str]:
    """The results as one table: a row per metric, a column per config, and with two configs whether
    their 95% intervals overlap."""
    labels = list(results)
    names = sorted(set().union(*(set(r) for r in results.values())))
    header = ["metric", *(f"{label} (mean ± 95% CI, n={len(seeds)})" for label in labels)]
    if len(labels) == 2:
        header.append("intervals")
    rows = [header]
    for name in names:
        row = [name, *(_cell(results[label][name]) if name in results[label] else "-" for label in labels)]
        if len(labels) == 2:
            a, b = (results[label].get(name) for label in labels)
            row.append("-" if a is None or b is None else "overlap" if a.overlaps(b) else "separate")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if len(labels) == 2:
        lines.append("overlap: the runs do not tell the two configs apart at 95%; separate: they do")
    return lines


def results_json(arms: Sequence[Arm], seeds: Sequence[int], results: dict[str, dict[str, Interval]]) -> dict[str, Any]:
    """The results as JSON: each config's overrides, run folders and, per metric, the interval."""
    document: dict[str, Any] = {"seeds": list(seeds), "confidence": 0.95, "configs": {}}
    for arm in arms:
        metrics = {}
        for name, interval in results[arm.label].items():
            entry = asdict(interval)
            entry["values"] = list(interval.values)
            entry["low"], entry["high"] = interval.low, interval.high
            metrics[name] = {key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in entry.items()}
        document["configs"][arm.label] = {
            "task": f"{arm.task_class.__module__}:{arm.task_class.__qualname__}",
            "overrides": list(arm.overrides),
            "metrics": metrics,
        }
    if len(arms) == 2:
        a, b = (results[arm.label] for arm in arms)
        document["overlap"] = {name: a[name].overlaps(b[name]) for name in sorted(set(a) & set(b))}
    return document


def repeat(
    arms: Sequence[Arm], seeds: Sequence[int], root: Path, jobs: int = 1, gpus: Sequence[str] = ()
) -> tuple[list[str], dict[str, Any]]:
    """Runs every config over ``seeds`` (under ``root/<label>/seed_<s>``, or ``root/seed_<s>`` for one
    config; ``jobs`` runs at once, pinned to ``gpus``, when above 1), writes ``root/repeat.json`` and
    returns the table's lines and the JSON document."""
    if len(seeds) < 2:
        raise ConfigError(f"seeds {list(seeds)}: an interval needs at least 2 seeds")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {list(seeds)} repeat a seed; give each once")
    if jobs > 1:
        for arm in arms:
            task_spec(arm.task_class)  # before any run starts
    results = {arm.label: run_arm(arm, seeds, root / arm.label if len(arms) > 1 else root, jobs, gpus) for arm in arms}
    document = results_json(arms, seeds, results)
    root.mkdir(parents=True, exist_ok=True)
    (root / "repeat.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return table_lines(results, seeds), document
