"""The training loop's first logging windows: the step rate of each window of an xax run, with the
TensorBoard logger importing tensorboardX in the background from the run's start (the library) or
on the logging thread at the first record (as it did before).

tensorboardX imports torch when it is installed, and an import holds the interpreter lock most of
the time: done at the first record, it slowed the windows right after it. Each setting runs in a
fresh process (nothing imported yet), GPT-2 small (``benchmarks.gpt2_throughput``'s xax task,
TensorBoard on) or its tiny version on the CPU; a window's rate is steps over the time between two
logged records.

    python -m benchmarks.first_windows --out benchmarks/results
    python -m benchmarks.first_windows --tiny      # the tiny model on the CPU
"""

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from benchmarks.common import run_child_processes, train_records, write_results

SETTINGS = ("background", "first_record")


def window_rates(run_dir: Path) -> list[tuple[int, float]]:
    """(last step, steps per second) of each logging window after the first record."""
    records = [(r["step"], r["elapsed_time_s"]) for r in train_records(run_dir)]
    return [(b[0], (b[0] - a[0]) / (b[1] - a[1])) for a, b in itertools.pairwise(records)]


def run_child(args: argparse.Namespace) -> None:
    from benchmarks.gpt2_throughput import Config, GPT2Throughput, make_setup, xax_argv

    def deferred(module: str) -> None:  # the library before: the import waits for the first record
        return None

    setup = make_setup(args.tiny, "auto" if args.tiny else "cudnn")
    # The library's internals, patched by name: the setting reproduces what the library no longer does.
    patch = mock.patch("xax.task.loggers.tensorboard.import_in_background", deferred)
    with tempfile.TemporaryDirectory() as run_dir, patch if args.child == "first_record" else contextlib.nullcontext():
        GPT2Throughput.launch(
            Config(batch_size=setup.batch, tiny=args.tiny, attention="auto" if args.tiny else "cudnn"),
            argv=[*xax_argv(run_dir, args.steps, args.every), "log.tensorboard=true", "log.stdout=false"],
        )
        rates = window_rates(Path(run_dir))
    args.result_file.write_text(json.dumps({"windows": rates, "torch_imported": "torch" in sys.modules}))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Step rates of the first logging windows, per tensorboardX import")
    parser.add_argument("--steps", type=int, default=None, help="Steps per run (default 400; 300 with --tiny)")
    parser.add_argument("--every", type=int, default=None, help="Steps per logging window (default 25)")
    parser.add_argument("--out", type=Path, default=None, help="Results folder (default benchmarks/results)")
    parser.add_argument("--tiny", action="store_true", help="The tiny model on the CPU")
    parser.add_argument("--child", choices=SETTINGS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (300 if args.tiny else 400)
    args.every = args.every or 25
    if args.child is not None:
        run_child(args)
        return
    flags = ["--steps", str(args.steps), "--every", str(args.every), *(["--tiny"] if args.tiny else [])]
    results = run_child_processes("benchmarks.first_windows", SETTINGS, flags)
    rows: list[dict[str, Any]] = []
    for setting in SETTINGS:
        result = results[setting]
        if result is None:
            rows.append({"tensorboardX import": setting, "first_window": "failed"})
            continue
        rates = [rate for _, rate in result["windows"]]
        settled = statistics.median(rates[len(rates) // 2 :])
        row: dict[str, Any] = {"tensorboardX import": setting, "settled_steps_per_s": settled}
        for rate, label in zip(rates[:4], ("first", "second", "third", "fourth"), strict=False):
            row[f"{label}_window_over_settled"] = rate / settled
        row["torch_imported"] = result["torch_imported"]
        rows.append(row)
    notes = (
        f"GPT-2 {'tiny on the CPU' if args.tiny else 'small'} (benchmarks.gpt2_throughput's xax task, TensorBoard on), "
        f"{args.steps} steps logged every {args.every}, each setting in a fresh process. A window's rate over the "
        "median of the second half's windows; the first window ends at the second record. `background`: the library "
        "(the import starts with the run); `first_record`: the import at the first record, as before."
    )
    out = args.out or (Path(tempfile.mkdtemp(prefix="xax_first_windows_")) if args.tiny else Path("benchmarks/results"))
    write_results(out, "first_windows", rows, notes, tiny=args.tiny)


if __name__ == "__main__":
    main()
