"""What ``log.layer_stats`` costs a GPT-2 small training step: xax's own loop with the per-module
statistics off and on, side by side in one process.

Each round runs both, in the order off, on in even rounds and on, off in odd ones: the first run of
a process is slower (its first logging window also starts the loggers), and alternating puts that on
both sides. Each run is ``benchmarks.gpt2_throughput``'s xax task (GPT-2 small, bf16, AdamW, batch
16 x 1024) timed from its logged records after the warmup, which must leave out the first two
logging windows (on an H100 they ran at half speed after the first step). The cost is the median
step time with the statistics over the median without, minus one.

    python -m benchmarks.layer_stats_cost --steps 400 --warmup 150 --rounds 2 --out benchmarks/results
    python -m benchmarks.layer_stats_cost --tiny    # a CPU check of the script; no numbers
"""

import argparse
import math
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import steps_per_second_after, train_records, write_results
from benchmarks.gpt2_throughput import Config, GPT2Throughput, make_setup, xax_argv


def timed_run(layer_stats: bool, args: argparse.Namespace) -> tuple[float, int]:
    """Steps per second of one run after the warmup, and how many ``layers/`` scalars it logged."""
    attention = "auto" if args.tiny else args.attention
    setup = make_setup(args.tiny, attention)
    with tempfile.TemporaryDirectory() as run_dir:
        GPT2Throughput.launch(
            Config(batch_size=setup.batch, tiny=args.tiny, attention=attention),
            argv=[*xax_argv(run_dir, args.steps, args.warmup), f"log.layer_stats={str(layer_stats).lower()}"],
        )
        last = train_records(Path(run_dir))[-1]["scalars"]
        return steps_per_second_after(Path(run_dir), args.warmup), sum(name.startswith("layers/") for name in last)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The cost of log.layer_stats on a GPT-2 small step")
    parser.add_argument("--steps", type=int, default=None, help="Steps per run (default 400; 8 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps of each run (default 150; 2 --tiny)")
    parser.add_argument("--rounds", type=int, default=2, help="Pairs of runs (off, on)")
    parser.add_argument("--attention", default="cudnn", help="JAX attention: cudnn, xla or auto (auto with --tiny)")
    parser.add_argument("--out", type=Path, default=None, help="Results folder (default benchmarks/results)")
    parser.add_argument("--tiny", action="store_true", help="Tiny model: checks the script on CPU")
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (8 if args.tiny else 400)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 150)
    if not 0 < args.warmup < args.steps or args.rounds < 1:
        raise SystemExit(f"error: need 0 < --warmup < --steps and --rounds >= 1, got {args.warmup}, {args.steps}")
    out = args.out or (Path(tempfile.mkdtemp(prefix="xax_layer_stats_")) if args.tiny else Path("benchmarks/results"))

    rates: dict[bool, list[float]] = {False: [], True: []}
    scalars: dict[bool, int] = {}
    for round_index in range(args.rounds):
        for layer_stats in (False, True) if round_index % 2 == 0 else (True, False):
            rate, scalars[layer_stats] = timed_run(layer_stats, args)
            rates[layer_stats].append(rate)
    step_ms = {on: 1000.0 / statistics.median(rates[on]) for on in (False, True)}
    rows: list[dict[str, Any]] = [
        {
            "layer_stats": "on" if on else "off",
            "step_ms (median)": step_ms[on],
            "steps_per_s (each run)": " ".join(f"{rate:.3f}" for rate in rates[on]),
            "layers_scalars": scalars[on],
            "cost_percent": 100.0 * (step_ms[on] / step_ms[False] - 1.0),
        }
        for on in (False, True)
    ]
    notes = (
        f"xax's GPT-2 small task (benchmarks.gpt2_throughput), {args.rounds} pairs of runs in one process (off, on; "
        f"then on, off), {args.steps} steps each, timed after step {args.warmup} from the logged records; logging "
        f"every {math.gcd(100, args.warmup)} steps. Target: at most 3% of the step."
    )
    write_results(out, "layer_stats_cost", rows, notes, tiny=args.tiny)


if __name__ == "__main__":
    main()
