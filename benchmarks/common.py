"""What every benchmark records next to its numbers: device, versions, date."""

import contextlib
import datetime
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import jax


def environment() -> dict[str, Any]:
    """Device, driver and library versions of this run."""
    device = jax.devices()[0]
    driver = ""
    with contextlib.suppress(OSError):
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    versions = {}
    for name in ("jax", "jaxlib", "equinox", "optax", "numpy", "datasets", "torch"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": getattr(device, "device_kind", device.platform),
        "device_count": jax.device_count(),
        "driver": driver,
        "python": platform.python_version(),
        "versions": versions,
    }


def write_results(out_dir: Path, name: str, env: dict[str, Any], rows: list[dict[str, Any]], notes: str) -> None:
    """Writes ``name.json`` and ``name.md`` (a table with the environment above it)."""
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
