"""The whole benchmark suite in one command, into one folder with a combined ``results.md``/``results.json``.

Each benchmark writes its own ``<name>.md`` and ``<name>.json`` into ``--out``; a benchmark that fails
is recorded as failed and the suite goes on. Calls with ``--only`` into the same folder add up in the
combined table. The step counts below are chosen so that the GPU suite
takes about nine minutes on one H100; ``--tiny`` runs every benchmark's CPU check instead.

    python -m benchmarks --out benchmarks/results
    python -m benchmarks --only compile_time,remat_memory --out /tmp/bench
    python -m benchmarks --tiny --out /tmp/bench_tiny
"""

import argparse
import json
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import (
    checkpoint_save,
    compile_time,
    dit_throughput,
    gpt2_throughput,
    input_pipeline,
    long_run,
    mnist_overhead,
    remat_memory,
    shakespeare_overhead,
)
from benchmarks.common import environment


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of the suite: its ``main(argv)`` and the arguments of the GPU run.

    Attributes:
        main: The benchmark's entry point; it writes ``<name>.md`` and ``<name>.json`` into ``--out``.
        gpu_argv: Arguments of the suite's GPU run (``--out`` and ``--tiny`` are added by the suite).
        minutes: About how long the GPU run takes on one H100.
    """

    main: Callable[[Sequence[str] | None], None]
    gpu_argv: tuple[str, ...]
    minutes: float


SUITE: dict[str, Benchmark] = {
    "mnist_overhead": Benchmark(mnist_overhead.main, ("--steps", "2000", "--warmup", "500", "--repeats", "1"), 0.5),
    "shakespeare_overhead": Benchmark(shakespeare_overhead.main, ("--steps", "500", "--warmup", "100"), 1.0),
    "input_pipeline": Benchmark(input_pipeline.main, ("--steps", "300", "--warmup", "100"), 1.0),
    "compile_time": Benchmark(compile_time.main, (), 1.0),
    "remat_memory": Benchmark(remat_memory.main, ("--policies", "none,full"), 1.0),
    "checkpoint_save": Benchmark(checkpoint_save.main, ("--saves", "2"), 0.75),
    "gpt2_throughput": Benchmark(gpt2_throughput.main, ("--steps", "200", "--warmup", "100"), 2.0),
    "dit_throughput": Benchmark(dit_throughput.main, ("--steps", "150", "--warmup", "50"), 1.5),
    "long_run": Benchmark(long_run.main, ("--minutes", "8"), 9.0),
}


def run_one(name: str, benchmark: Benchmark, out: Path, tiny: bool) -> dict[str, Any]:
    """Runs one benchmark; returns its status, duration and the rows it wrote."""
    argv = ["--out", str(out), *(["--tiny"] if tiny else benchmark.gpu_argv)]
    print(f"== {name}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    try:
        benchmark.main(argv)
        status = "ok"
    except (Exception, SystemExit) as error:  # one failure must not end the suite
        traceback.print_exc()
        status = f"failed: {type(error).__name__}: {error}"
    seconds = time.perf_counter() - start
    result_name = f"{name}_tiny" if tiny else name
    path = out / f"{result_name}.json"
    rows = json.loads(path.read_text())["results"] if status == "ok" and path.exists() else []
    print(f"== {name}: {status} in {seconds:.0f} s", flush=True)
    return {"name": name, "status": status, "seconds": seconds, "file": f"{result_name}.md", "results": rows}


def write_combined(out: Path, env: dict[str, Any], runs: list[dict[str, Any]], tiny: bool) -> None:
    """Writes ``results.json`` (every benchmark's rows) and ``results.md`` (a summary table, then each
    benchmark's own table)."""
    (out / "results.json").write_text(json.dumps({"environment": env, "tiny": tiny, "benchmarks": runs}, indent=2))
    lines = [
        "# Benchmark suite" + (" (TINY: CPU checks, not measurements)" if tiny else ""),
        "",
        f"- date: {env['date']}",
        f"- device: {env['device']} x{env['device_count']} (driver {env['driver'] or 'n/a'})",
        f"- python {env['python']}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- total: {sum(run['seconds'] for run in runs) / 60:.1f} minutes",
        "",
        "| benchmark | status | seconds | details |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {r['file']} |" for r in runs]
    for run in runs:
        detail = out / run["file"]
        if run["status"] == "ok" and detail.exists():
            # Each benchmark's own page, its title one level down.
            lines += ["", "#" + detail.read_text().strip()]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def merged_with_earlier(out: Path, runs: list[dict[str, Any]], tiny: bool) -> list[dict[str, Any]]:
    """The suite's runs in suite order: these, and those of an earlier ``--only`` call into the same
    folder (same mode) that these did not repeat, so a suite split over several calls adds up."""
    earlier_path = out / "results.json"
    earlier: list[dict[str, Any]] = []
    if earlier_path.exists():
        data = json.loads(earlier_path.read_text())
        earlier = data["benchmarks"] if data.get("tiny") == tiny else []
    by_name = {run["name"]: run for run in earlier if run["name"] in SUITE}
    by_name.update({run["name"]: run for run in runs})
    return [by_name[name] for name in SUITE if name in by_name]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Runs the benchmark suite into one folder")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="Results folder")
    parser.add_argument("--only", default=None, help=f"Comma-separated subset of: {','.join(SUITE)}")
    parser.add_argument("--tiny", action="store_true", help="Every benchmark's CPU check (no numbers)")
    args = parser.parse_args(argv)
    names = list(SUITE) if args.only is None else [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(names) - set(SUITE))
    if unknown or not names:
        raise SystemExit(f"error: --only {args.only!r} names {unknown or 'nothing'}; choose from {','.join(SUITE)}")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [run_one(name, SUITE[name], args.out, args.tiny) for name in names]
    write_combined(args.out, environment(), merged_with_earlier(args.out, runs, args.tiny), args.tiny)
    print(f"Wrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    failed = [run["name"] for run in runs if run["status"] != "ok"]
    if failed:
        raise SystemExit(f"error: {', '.join(failed)} failed; see their output above")


if __name__ == "__main__":
    main()
