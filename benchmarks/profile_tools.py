"""Where a jitted step spends its device time: a kernel-by-kernel breakdown from a profiler trace.

``kernel_breakdown(fn, *args)`` runs ``fn`` a few times under ``jax.profiler.trace`` and sums the
duration of every event on the device planes by name, so the heaviest kernels (fusions, GEMMs,
attention) of a step can be read without a trace viewer::

    rows = kernel_breakdown(step, params, opt_state, batch, steps=5)
    print(format_breakdown(rows, top=25))
"""

import collections
import re
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


# ---- what a kernel of the breakdown computes -----------------------------------------------------

DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
DTYPE_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16})
# ``%name = type opcode(operands), attributes``; a type is ``bf16[2,3]{1,0}`` or a tuple of them.
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\([^=]*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?) (\w[\w\-]*)\((.*)")
ARRAY_TYPE = re.compile(r"(\w+)\[([\d,]*)\]")
COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")


@dataclass(frozen=True)
class Fusion:
    """One fusion (or other instruction) of a compiled module, named as the profiler names its kernel.

    Attributes:
        name: The kernel name (the instruction's name with ``.`` and ``-`` as ``_``).
        output: The output type (``bf16[256,256,768]``, or a tuple of them).
        bytes_in: Bytes of its operands (read at least once per call).
        bytes_out: Bytes of its outputs.
        passes: "fwd", "bwd" or "fwd+bwd": whether its ops come from the forward pass, from the
            backward (``transpose(jvp(...))`` in their op names), or both.
        sources: The user source lines (``file.py:line``) of its ops, the most frequent first.
    """

    name: str
    output: str
    bytes_in: int
    bytes_out: int
    passes: str
    sources: tuple[str, ...]


def type_bytes(text: str) -> int:
    """Bytes of an HLO type: ``bf16[2,3]{1,0}`` is 12; a tuple is the sum of its elements."""
    total = 0
    for dtype, dims in ARRAY_TYPE.findall(text):
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        total += count * DTYPE_BYTES.get(dtype, 0)
    return total


def source_table(hlo_text: str) -> dict[int, str]:
    """``stack_frame_id -> "file.py:line"`` from a module's ``FileNames``/``FileLocations``/``StackFrames``."""
    section = ""
    files: dict[int, str] = {}
    locations: dict[int, str] = {}
    frames: dict[int, str] = {}
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if not line.strip() or line.startswith(("%", "ENTRY", "HloModule")):
            section = "" if not line.strip() else section
            continue
        if section == "FileNames":
            index, _, name = line.partition(" ")
            files[int(index)] = Path(name.strip().strip('"')).name
        elif section == "FileLocations":
            index, _, rest = line.partition(" ")
            found = re.search(r"file_name_id=(\d+).*?\bline=(\d+)", rest)
            if found is not None:
                locations[int(index)] = f"{files.get(int(found.group(1)), '?')}:{found.group(2)}"
        elif section == "StackFrames":
            index, _, rest = line.partition(" ")
            location = re.search(r"file_location_id=(\d+)", rest)
            if location is not None:
                frames[int(index)] = locations.get(int(location.group(1)), "?")
    return frames


def fusions_of(hlo_text: str) -> dict[str, Fusion]:
    """Every instruction of a compiled module's entry and called computations that runs as a kernel
    of its own (fusions, custom calls, copies...), by kernel name, with what it reads, writes and
    computes; ``compiled.as_text()`` of a jitted step is such a module."""
    frames = source_table(hlo_text)
    types: dict[str, str] = {}
    calls: dict[str, str] = {}
    operands: dict[str, list[str]] = {}
    bodies: dict[str, list[str]] = collections.defaultdict(list)
    own_lines: dict[str, str] = {}
    computation = ""
    for line in hlo_text.splitlines():
        header = COMPUTATION.match(line)
        if header is not None:
            computation = header.group(1)
            continue
        match = INSTRUCTION.match(line)
        if match is None:
            continue
        name, type_text, _, rest = match.groups()
        types[name] = type_text
        own_lines[name] = line
        bodies[computation].append(line)
        args = rest.split(")", 1)[0]
        operands[name] = re.findall(r"%([\w.\-]+)", args)
        called = re.search(r"calls=%([\w.\-]+)", rest)
        if called is not None:
            calls[name] = called.group(1)
    result: dict[str, Fusion] = {}
    for name, type_text in types.items():
        body = bodies.get(calls.get(name, ""), [])
        lines = body or [own_lines[name]]  # a fusion's ops, or an unfused instruction itself
        sources: collections.Counter[str] = collections.Counter()
        passes = set()
        for line in lines:
            frame = re.search(r"stack_frame_id=(\d+)", line)
            if frame is not None and int(frame.group(1)) in frames:
                sources[frames[int(frame.group(1))]] += 1
            op_name = re.search(r'op_name="([^"]*)"', line)
            if op_name is not None:
                passes.add("bwd" if "transpose(" in op_name.group(1) else "fwd")
        kernel = re.sub(r"[.\-]", "_", name)
        result[kernel] = Fusion(
            name=kernel,
            output=re.sub(r"\{[^}]*\}", "", type_text),
            bytes_in=sum(type_bytes(types.get(operand, "")) for operand in operands.get(name, [])),
            bytes_out=type_bytes(type_text),
            passes="+".join(sorted(passes, key=["fwd", "bwd"].index)) or "-",
            sources=tuple(source for source, _ in sources.most_common()),
        )
    return result


def format_explained(rows: Sequence[KernelTime], hlo_text: str, *, steps: int, top: int = 25) -> str:
    """A markdown table of the ``top`` heaviest kernels that are instructions of ``hlo_text`` (the
    compiled step): time, bytes moved per call and the bandwidth that gives, output, pass and source
    lines. Library kernels (cuBLAS, cuDNN) have no instruction of that name and are left out."""
    fusions = fusions_of(hlo_text)
    lines = [
        "| ms/step | calls/step | MB/call | GB/s | output | pass | sources | kernel |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    shown = 0
    for row in rows:
        fusion = fusions.get(row.name)
        if fusion is None:
            continue
        moved = fusion.bytes_in + fusion.bytes_out
        per_call_s = row.total_ms / 1e3 / max(row.count, 1)
        rate = f"{moved / per_call_s / 1e9:.0f}" if per_call_s > 0 else "-"
        where = ", ".join(fusion.sources[:3]) or "-"
        output = fusion.output if len(fusion.output) <= 60 else fusion.output[:57] + "..."
        lines.append(
            f"| {row.total_ms / steps:.3f} | {row.count / steps:g} | {moved / 1e6:.1f} | {rate} | `{output}` "
            f"| {fusion.passes} | {where} | `{row.name}` |"
        )
        shown += 1
        if shown == top:
            break
    return "\n".join(lines)


def format_with_fusions(rows: Sequence[KernelTime], hlo_text: str | None, *, steps: int, top: int = 25) -> str:
    """``format_breakdown`` followed by ``format_explained``: the kernels, then what the fusions among them move
    (``hlo_text`` is ``compiled.as_text()``, which may be None: then the kernels alone)."""
    if hlo_text is None:
        return format_breakdown(rows, steps=steps, top=top)
    explained = format_explained(rows, hlo_text, steps=steps, top=top)
    breakdown = format_breakdown(rows, steps=steps, top=top)
    return f"{breakdown}\n\nThe fusions among them, with the bytes each reads and writes per call:\n\n{explained}"
