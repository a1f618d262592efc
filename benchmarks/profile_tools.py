"""Where a jitted step spends its device time: a kernel-by-kernel breakdown from a profiler trace.

``kernel_breakdown(fn, *args)`` runs ``fn`` a few times under ``jax.profiler.trace`` and sums the
duration of every event on the device planes by name, so the heaviest kernels (fusions, GEMMs,
attention) of a step can be read without a trace viewer::

    rows = kernel_breakdown(step, params, opt_state, batch, steps=5)
    print(format_breakdown(rows, top=25))
"""

import collections
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from jax.profiler import ProfileData


@dataclass(frozen=True)
class KernelTime:
    """Total device time of one kernel name over the profiled steps.

    Attributes:
        plane: The profiler plane (e.g. ``/device:GPU:0``).
        line: The line of the plane (e.g. the CUDA stream, or ``XLA Ops``).
        name: The event name (kernel or XLA op).
        count: How many times it ran.
        total_ms: Milliseconds summed over the profiled steps.
    """

    plane: str
    line: str
    name: str
    count: int
    total_ms: float


def aggregate_trace(path: Path, plane_prefix: str = "/device:") -> list[KernelTime]:
    """Sums the events of every plane whose name starts with ``plane_prefix``, by (plane, line, name)."""
    data = ProfileData.from_file(str(path))
    totals: dict[tuple[str, str, str], list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for plane in data.planes:
        if not plane.name.startswith(plane_prefix):
            continue
        for line in plane.lines:
            for event in line.events:
                entry = totals[(plane.name, line.name, event.name)]
                entry[0] += 1
                entry[1] += event.duration_ns / 1e6
    rows = [KernelTime(p, li, n, int(c), ms) for (p, li, n), (c, ms) in totals.items()]
    return sorted(rows, key=lambda row: -row.total_ms)


def kernel_breakdown(
    fn: Callable[..., Any],
    *args: Any,
    steps: int = 5,
    thread: Callable[[Any, Sequence[Any]], Sequence[Any]] | None = None,
) -> list[KernelTime]:
    """Profiles ``steps`` calls of ``fn`` and returns the device time by kernel name.

    Args:
        fn: A compiled (warmed-up) step.
        args: Its arguments.
        steps: Calls to profile.
        thread: Given ``(output, args)``, the arguments of the next call (for steps that donate
            their inputs and return the new state); None calls ``fn(*args)`` each time.

    Returns:
        Rows sorted by total time, heaviest first.
    """
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            out = None
            for _ in range(steps):
                out = fn(*args)
                if thread is not None:
                    args = tuple(thread(out, args))
            jax.block_until_ready(out)
        traces = sorted(Path(tmp).rglob("*.xplane.pb"))
        if not traces:
            raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {tmp}")
        return aggregate_trace(traces[-1])


def format_breakdown(rows: Sequence[KernelTime], *, steps: int, top: int = 25) -> str:
    """A markdown table of the ``top`` heaviest kernels per line, in milliseconds per step."""
    by_line: dict[tuple[str, str], list[KernelTime]] = collections.defaultdict(list)
    for row in rows:
        by_line[(row.plane, row.line)].append(row)
    parts = []
    for (plane, line), line_rows in sorted(by_line.items(), key=lambda item: -sum(r.total_ms for r in item[1])):
        total = sum(r.total_ms for r in line_rows) / steps
        parts.append(f"\n**{plane} / {line}**: {total:.2f} ms per step over {len(line_rows)} names\n")
        parts.append("| ms/step | calls/step | name |\n| --- | --- | --- |")
        for row in line_rows[:top]:
            name = row.name if len(row.name) <= 110 else row.name[:107] + "..."
            parts.append(f"| {row.total_ms / steps:.3f} | {row.count / steps:g} | `{name}` |")
    return "\n".join(parts)
