"""Time to the first training step: a cold launch against a second launch that finds the persistent
compilation cache filled by the first.

Both launches run ``python -m examples.shakespeare`` (the GPT) in processes of their own, for one
step, with a fresh cache folder (``compile.cache_dir``) that only these two runs use. The time to
the first step is xax's ``time_to_first_step_s`` (from the loop's start to the first step's
result: tracing, compiling or loading from the cache, and the step itself); the process wall time,
imports and the final validation and checkpoint included, is given beside it.

    python -m benchmarks.compile_time --out benchmarks/results
    python -m benchmarks.compile_time --tiny      # a CPU check of the script; no numbers
"""

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import train_records, write_results

TINY_ARGV = [
    "context=32",
    "batch_size=8",
    "gpt.num_layers=1",
    "gpt.d_model=32",
    "gpt.num_heads=2",
    "num_chars=8",
    "precision.compute_dtype=float32",
]


def launch(run_dir: Path, cache_dir: Path, tiny: bool) -> tuple[float, float]:
    """One launch of the example for one step; returns (time to first step, process wall time)."""
    argv = [
        f"artifacts.run_dir={run_dir}",
        "launcher.kind=single_device",
        "max_steps=1",
        f"compile.cache_dir={cache_dir}",
        # Every program goes to the cache, as a long run's would (they all take long on a GPU).
        "compile.cache_min_compile_time_s=0",
        "log.tensorboard=false",
        *(TINY_ARGV if tiny else []),
    ]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "examples.shakespeare", *argv], check=True)
    wall = time.perf_counter() - start
    first = train_records(run_dir)[0]["scalars"]["time_to_first_step_s"]
    return float(first), wall


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Time to first step: cold against the persistent cache")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tiny", action="store_true", help="Tiny model: checks the script on CPU")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cold_first, cold_wall = launch(Path(tmp) / "cold", cache, args.tiny)
        cached_files = sum(1 for path in cache.rglob("*") if path.is_file())
        warm_first, warm_wall = launch(Path(tmp) / "warm", cache, args.tiny)
    rows = [
        {"launch": "cold (empty cache)", "first_step_s": cold_first, "process_s": cold_wall, "speedup": 1.0},
        {
            "launch": "second (persistent cache)",
            "first_step_s": warm_first,
            "process_s": warm_wall,
            "speedup": cold_first / warm_first,
        },
    ]
    notes = (
        f"examples.shakespeare (GPT), one step, "
        f"separate processes, a fresh cache folder ({cached_files} entries after the cold launch). "
        "Target: the second launch's time to first step at least 3x shorter."
    )
    write_results(args.out, "compile_time", rows, notes, tiny=args.tiny)


if __name__ == "__main__":
    main()
