"""``xax runs diff A B``: what differs between two runs, most likely to change the numbers first, and
where their metric curves part.

The provenance of each run (``provenance.json``, ``xax.task.provenance``) is compared section by
section: 1 the compiled step, 2 the data, 3 versions, backend, devices, flags and environment,
4 the config (key by key; keys that cannot change the numbers, such as logging cadences, after the
others), 5 git. Each run is taken as it began (its latest start from step 0; a run folder reused
for a new run keeps the older entries), and a run whose environment changed across its resumes
says so. Then the logged history (``read_history``) of each shared metric is compared step by
step: the first step where the runs differ beyond a relative tolerance, and the final values.
"""

import math
from dataclasses import dataclass
from typing import Any

from etils import epath

from xax.checkpoint.metadata import flatten_dict
from xax.task.loggers.jsonl import read_history
from xax.task.loggers.sections import dashboard_tag
from xax.task.provenance import ENVIRONMENT_KEYS, SECTIONS, read_provenance
from xax.utils.storage import storage_path

# Config keys that name where a run is stored: different for any two runs, never a cause.
OWN_LOCATION_KEYS = frozenset({"artifacts.run_dir", "artifacts.runs_root"})
# Config groups and keys that cannot change what is computed (cadences, monitoring, storage).
BOOKKEEPING_GROUPS = ("artifacts", "log", "checkpoint", "perf", "cpu_stats", "gpu_stats", "process", "watchdog")
BOOKKEEPING_KEYS = frozenset(
    {"resume", "parallel.report", "data.prefetch", "compile.cache", "compile.cache_dir", "compile.log_compiles"}
)
BOOKKEEPING_NOTE = "(cannot change the numbers)"
DEFAULT_RTOL = 1e-6
_MISSING = "(absent)"
_SHOWN_CHARS = 160


@dataclass(frozen=True)
class Difference:
    """One value that differs between two entries, by its dotted key."""

    key: str
    a: Any
    b: Any

    def line(self) -> str:
        return f"{self.key}: {_show(self.a)} -> {_show(self.b)}"


@dataclass(frozen=True)
class Run:
    """A run's folder and its provenance: the entry it began with and its later starts (resumes)."""

    path: epath.Path
    opening: dict[str, Any]
    resumes: list[dict[str, Any]]
    total_starts: int


def open_run(path: epath.PathLike) -> Run:
    """Reads the ``provenance.json`` of a run (a local folder or a ``gs://``/``s3://`` URL); raises
    ``ProvenanceError`` naming the path and the fix when it cannot."""
    path = storage_path(path)
    starts = read_provenance(path)
    fresh = [i for i, entry in enumerate(starts) if entry.get("start_step") == 0]
    first = fresh[-1] if fresh else 0
    return Run(path, starts[first], starts[first + 1 :], len(starts))


def _show(value: Any) -> str:
    text = _MISSING if value is _MISSING else value if isinstance(value, str) else repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _section(entry: dict[str, Any], name: str) -> dict[str, Any]:
    """The flat values of one ranked section of an entry."""
    if name == "step":
        step = entry.get("step")
        if step is None:
            return {"sha256": "not recorded (the run stopped before its first step)"}
        return {"sha256": step["sha256"][:16] if step.get("sha256") else step.get("note", "not recorded")}
    if name == "environment":
        return flatten_dict({key: entry.get(key) or {} for key in ENVIRONMENT_KEYS})
    if name == "config":
        return {k: v for k, v in flatten_dict(entry.get("config") or {}).items() if k not in OWN_LOCATION_KEYS}
    return flatten_dict(entry.get(name) or {})


def _is_bookkeeping(key: str) -> bool:
    return key in BOOKKEEPING_KEYS or key.split(".", 1)[0] in BOOKKEEPING_GROUPS


def section_differences(a: dict[str, Any], b: dict[str, Any], name: str) -> list[Difference]:
    """The values of section ``name`` that differ between entries ``a`` and ``b``, in their order.

    Modules imported by only one of the runs are not compared (what a run imports depends on its
    options); the config's keys that cannot change the numbers come last.
    """
    flat_a, flat_b = _section(a, name), _section(b, name)
    keys = [*flat_a, *(key for key in flat_b if key not in flat_a)]
    if name == "environment":
        modules = "xax.module_sha256."
        keys = [key for key in keys if not key.startswith(modules) or (key in flat_a and key in flat_b)]
    found = [
        Difference(key, flat_a.get(key, _MISSING), flat_b.get(key, _MISSING))
        for key in keys
        if flat_a.get(key, _MISSING) != flat_b.get(key, _MISSING)
    ]
    if name == "config":
        found.sort(key=lambda difference: _is_bookkeeping(difference.key))
    return found


def provenance_lines(a: Run, b: Run) -> list[str]:
    """The ranked differences between two runs' provenance; empty when there are none."""
    lines: list[str] = []
    causes = []
    for rank, (name, title) in enumerate(SECTIONS, start=1):
        found = section_differences(a.opening, b.opening, name)
        if not found:
            continue
        named = [d.key for d in found if name != "config" or not _is_bookkeeping(d.key)]
        causes.append(f"{title} ({', '.join(named[:3])}{', ...' if len(named) > 3 else ''})" if named else title)
        lines.append(f"{rank} {title}")
        for difference in found:
            note = f"  {BOOKKEEPING_NOTE}" if name == "config" and _is_bookkeeping(difference.key) else ""
            lines.append(f"    {difference.line()}{note}")
    if lines:
        lines = ["Differences, most likely to change the numbers first:", *lines]
        lines.insert(0, f"Differs in: {'; '.join(causes)}")
    for label, run in (("A", a), ("B", b)):
        lines += resume_lines(label, run)
    return lines


def resume_lines(label: str, run: Run) -> list[str]:
    """What changed in a run's later starts (its resumes) against the start it began with."""
    lines = []
    for number, entry in enumerate(run.resumes, start=run.total_starts - len(run.resumes) + 1):
        found = [d for name, _ in SECTIONS for d in section_differences(run.opening, entry, name)]
        if found:
            at = entry.get("start_step")
            where = f"resumed at step {at}" if at is not None else "stopped before its first step"
            lines.append(f"{label} changed at its start {number} ({where}):")
            lines += [f"    {difference.line()}" for difference in found]
    return lines


def _curves(path: epath.Path) -> dict[str, dict[int, float]] | None:
    """Each task metric's logged values by step (``train/<name>``, ``valid/<name>``); None without a log."""
    if not (path / "log.jsonl").is_file():
        return None
    curves: dict[str, dict[int, float]] = {}
    for record in read_history(path):
        for name, value in record["scalars"].items():
            if dashboard_tag(name) == name and isinstance(value, int | float):
                curves.setdefault(f"{record['phase']}/{name}", {})[int(record["step"])] = float(value)
    return curves


def _close(x: float, y: float, rtol: float) -> bool:
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return x == y or abs(x - y) <= rtol * max(abs(x), abs(y))


def _last(curve: dict[int, float]) -> tuple[int, float]:
    step = max(curve)
    return step, curve[step]


def curve_lines(a: Run, b: Run, rtol: float) -> tuple[list[str], bool]:
    """The comparison of the runs' metric curves, and whether they differ."""
    curves_a, curves_b = _curves(a.path), _curves(b.path)
    title = f"Metric curves (relative tolerance {rtol:g}):"
    if curves_a is None or curves_b is None:
        missing = " and ".join(str(run.path / "log.jsonl") for run, c in ((a, curves_a), (b, curves_b)) if c is None)
        return [title, f"    not compared: {missing} is missing (log.jsonl=false)"], False
    names = sorted(set(curves_a) | set(curves_b))
    if not names:
        return [title, "    no metrics logged"], False
    rows, differ = [], False
    for name in names:
        if name not in curves_a or name not in curves_b:
            rows.append((name, f"logged by {'A' if name in curves_a else 'B'} only"))
            differ = True
            continue
        row, parted = _compare_curve(curves_a[name], curves_b[name], rtol)
        rows.append((name, row))
        differ = differ or parted
    width = max(len(name) for name, _ in rows)
    return [title, *(f"    {name.ljust(width)}  {row}" for name, row in rows)], differ


def _compare_curve(a: dict[int, float], b: dict[int, float], rtol: float) -> tuple[str, bool]:
    (step_a, final_a), (step_b, final_b) = _last(a), _last(b)
    final = f"final {final_a:.6g} (step {step_a}) vs {final_b:.6g} (step {step_b})"
    if step_a == step_b and _close(final_a, final_b, rtol):
        final = f"final {final_a:.6g} (step {step_a})"
    shared = sorted(set(a) & set(b))
    for step in shared:
        if not _close(a[step], b[step], rtol):
            return f"differs from step {step} ({a[step]:.6g} vs {b[step]:.6g}); {final}", True
    if not shared:
        return f"no step logged by both; {final}", True
    if set(a) != set(b):
        return f"same at the {len(shared)} steps logged by both, logged at other steps too; {final}", True
    return f"same at all {len(shared)} logged steps; {final}", False


def diff_runs(a: epath.PathLike, b: epath.PathLike, *, rtol: float = DEFAULT_RTOL) -> tuple[list[str], bool]:
    """The report ``xax runs diff`` prints and whether the runs differ.

    Args:
        a: The reference run's directory (a local folder, or a ``gs://``/``s3://`` URL).
        b: The run compared with it.
        rtol: Two logged values are the same when ``|a - b| <= rtol * max(|a|, |b|)``.

    Returns:
        The lines, and True when the provenance or a metric curve differs.

    Raises:
        ProvenanceError: When a folder or its ``provenance.json`` is missing or unreadable.
    """
    run_a, run_b = open_run(a), open_run(b)
    lines = [_header("A", run_a), _header("B", run_b)]
    provenance = provenance_lines(run_a, run_b)
    lines += provenance or ["Provenance: no differences"]
    curves, curves_differ = curve_lines(run_a, run_b, rtol)
    return [*lines, *curves], bool(provenance) or curves_differ


def _header(label: str, run: Run) -> str:
    starts = f"{run.total_starts} starts" if run.total_starts != 1 else "1 start"
    return f"{label}: {run.path} ({starts}; began {run.opening.get('started', 'at an unknown time')})"
