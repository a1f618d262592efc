"""What every benchmark records next to its numbers: device, versions, date."""

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import jax


def reference_attention(attention: str) -> Literal["cudnn", "xla"]:
    """The hand-written references' attention for ``--jax-attention``: "auto" is cuDNN on a GPU, else XLA."""
    if attention == "auto":
        return "cudnn" if jax.default_backend() == "gpu" else "xla"
    return "cudnn" if attention == "cudnn" else "xla"


def _nvidia_smi(query: str) -> list[str]:
    """One line per GPU of ``nvidia-smi --query-gpu=QUERY``; empty without NVIDIA's driver."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]
    return []


def environment() -> dict[str, Any]:
    """Device, driver and library versions of this run.

    On an NVIDIA machine the GPUs are described by ``nvidia-smi``, not JAX: a benchmark's parent
    process writes its results between its children's runs, and JAX, started there, would take most
    of the GPU's memory from the next child.
    """
    gpus = _nvidia_smi("name,driver_version")
    if gpus:
        name, _, driver = gpus[0].rpartition(", ")
        device, device_count = name, len(gpus)
    else:
        jax_device = jax.devices()[0]
        device, device_count, driver = getattr(jax_device, "device_kind", jax_device.platform), jax.device_count(), ""
    versions = {}
    for package in ("jax", "jaxlib", "equinox", "optax", "numpy", "datasets", "torch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "device_count": device_count,
        "driver": driver,
        "python": platform.python_version(),
        "versions": versions,
    }


# What the notes of a --tiny run start with.
TINY_NOTE = "TINY (a CPU check, not a measurement): "


def write_results(out_dir: Path, name: str, rows: list[dict[str, Any]], notes: str, *, tiny: bool = False) -> str:
    """Writes ``name.json`` and ``name.md`` (a table with this process's environment above it); a
    ``tiny`` run writes ``name_tiny`` and says so first in its notes. Returns the name written."""
    env = environment()
    if tiny:
        name, notes = f"{name}_tiny", TINY_NOTE + notes
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    keys = list(rows[0])
    lines = [
        f"# {name}",
        "",
        f"- date: {env['date']}",
        f"- device: {env['device']} x{env['device_count']} (driver {env['driver'] or 'n/a'})",
        f"- python {env['python']}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        "",
        "| " + " | ".join(keys) + " |",
        "| " + " | ".join("---" for _ in keys) + " |",
    ]
    for row in rows:
        lines.append(
            "| " + " | ".join(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |"
        )
    lines += ["", notes, ""]
    (out_dir / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return name


def train_records(run_dir: Path) -> list[dict[str, Any]]:
    """The training records of an xax run's ``log.jsonl``, in step order."""
    from xax import read_history

    return read_history(run_dir, phase="train")


def steps_per_second_after(run_dir: Path, warmup: int) -> float:
    """Steps per second of an xax run between its first training record at or after step ``warmup``
    and its last one (from the JSONL ``elapsed_time_s``, so compilation and warmup are left out).

    Raises:
        RuntimeError: If fewer than two records follow the warmup.
    """
    timed = [(r["step"], r["elapsed_time_s"]) for r in train_records(run_dir) if r["step"] >= warmup]
    if len(timed) < 2 or timed[-1][0] == timed[0][0]:
        raise RuntimeError(f"{run_dir} has {len(timed)} training record(s) from step {warmup} on; log more often")
    (first_step, first_s), (last_step, last_s) = timed[0], timed[-1]
    return (last_step - first_step) / (last_s - first_s)


def quiet_run_argv(run_dir: Path | str, steps: int) -> list[str]:
    """Overrides for an xax benchmark run: one device, a fixed step count, no validation, no media,
    logging by steps only, and no cache shared with other runs."""
    return [
        f"artifacts.run_dir={run_dir}",
        "launcher.kind=single_device",
        f"max_steps={steps}",
        "valid_every_n_steps=null",
        "log.every_n_seconds=null",
        "log.heavy_every_n_steps=null",
        "log.heavy_every_n_seconds=null",
        "compile.cache=false",
    ]


def run_child_processes(
    module: str,
    children: Sequence[str],
    flags: Sequence[str],
    *,
    extra_env: Callable[[str], dict[str, str]] | None = None,
    extra_xla_flags: Callable[[str], str] | None = None,
) -> dict[str, dict[str, Any] | None]:
    """Runs ``python -m module --child NAME --result-file F *flags`` once per child, one after
    another, each in a fresh process (so no allocator holds memory the next one needs), and reads
    back the JSON each wrote to ``F``.

    Args:
        module: The benchmark module; its ``--child NAME`` mode measures one thing and writes JSON.
        children: The names to run, in order.
        flags: Flags passed to every child.
        extra_env: Environment variables for a child, by name (e.g. keeping JAX off the GPU).
        extra_xla_flags: XLA flags appended to ``XLA_FLAGS`` for a child, by name.

    Returns:
        Each child's JSON, or None for a child that failed (its exit code is printed).
    """
    results: dict[str, dict[str, Any] | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for child in children:
            result = Path(tmp) / f"{child.replace('/', '_')}.json"
            command = [sys.executable, "-m", module, "--child", child, "--result-file", str(result), *flags]
            env = dict(os.environ)
            env.update(extra_env(child) if extra_env is not None else {})
            xla_flags = extra_xla_flags(child) if extra_xla_flags is not None else ""
            if xla_flags:
                env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
            print(f"== {child}: {' '.join(command[1:])}", flush=True)
            finished = subprocess.run(command, env=env, check=False)
            ok = finished.returncode == 0 and result.exists()
            results[child] = json.loads(result.read_text()) if ok else None
            print(f"== {child}: {'ok' if ok else f'failed with exit code {finished.returncode}'}", flush=True)
    return results
