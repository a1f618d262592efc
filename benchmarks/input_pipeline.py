"""The input pipeline: how fast the prefetching loader makes batches, against how fast the training step
consumes them, and the share of the loop's time spent waiting for data in the examples.

- Loader: the Shakespeare training windows read through xax's prefetch path (``data.device_resident_max_mb=0``,
  so every batch is gathered on the host by the background worker and placed on the device), pulled as
  fast as the loader gives them: batches per second.
- Step: the example's training step rate through the Task loop on that same path (steps per second
  after the warmup), and its logged ``data_wait_fraction``.
- The examples as shipped (MNIST and Shakespeare, their training sets resident on the device): their
  logged ``data_wait_fraction``.

    python -m benchmarks.input_pipeline --out benchmarks/results
    python -m benchmarks.input_pipeline --tiny      # a CPU check of the script; no numbers
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from benchmarks.common import quiet_run_argv, steps_per_second_after, train_records, write_results
from benchmarks.shakespeare_overhead import make_config
from examples.mnist import Config as MnistConfig
from examples.mnist import MnistClassification
from examples.shakespeare import Shakespeare
from xax import DataOptions

PREFETCH_ONLY = DataOptions(device_resident_max_mb=0)


def loader_batches_per_second(tiny: bool, batches: int, warmup: int) -> float:
    """Batches per second of the prefetching loader alone, each batch waited on until it is on the device."""
    config = make_config(tiny)
    config.data = PREFETCH_ONLY
    task = Shakespeare(config)
    feed = task.make_train_feed()
    try:
        batch: Any = None
        for _ in range(warmup):
            batch = next(feed)
        jax.block_until_ready(batch)
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(feed)
            jax.block_until_ready(batch)
        return batches / (time.perf_counter() - start)
    finally:
        feed.close()


def run_task(task: Any, config: Any, steps: int, warmup: int) -> tuple[float, float]:
    """Steps per second after ``warmup`` and the mean logged ``data_wait_fraction`` of those windows."""
    with tempfile.TemporaryDirectory() as run_dir:
        task.launch(config, argv=[*quiet_run_argv(run_dir, steps), f"log.every_n_steps={warmup}"])
        rate = steps_per_second_after(Path(run_dir), warmup)
        waits = [r["scalars"]["data_wait_fraction"] for r in train_records(Path(run_dir)) if r["step"] > warmup]
    return rate, statistics.mean(waits)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Loader throughput against the training step's consumption")
    parser.add_argument("--steps", type=int, default=None, help="Training steps per run (default 400; 24 --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps first (default 100; 8 --tiny)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tiny", action="store_true", help="Tiny models: checks the script on CPU")
    args = parser.parse_args(argv)
    steps, warmup = args.steps or (24 if args.tiny else 400), args.warmup or (8 if args.tiny else 100)
    if not 0 < warmup < steps:
        raise SystemExit(f"error: need 0 < --warmup < --steps, got --warmup {warmup} --steps {steps}")

    loader = loader_batches_per_second(args.tiny, batches=steps, warmup=warmup)
    prefetched = make_config(args.tiny)
    prefetched.data = PREFETCH_ONLY
    step_rate, prefetch_wait = run_task(Shakespeare, prefetched, steps, warmup)
    _, shakespeare_wait = run_task(Shakespeare, make_config(args.tiny), steps, warmup)
    mnist_config = MnistConfig(batch_size=128, channels=4, hidden=16) if args.tiny else MnistConfig(batch_size=128)
    _, mnist_wait = run_task(MnistClassification, mnist_config, steps, warmup)
    rows = [
        {"measure": "loader batches/s (prefetch path)", "value": loader, "target": ""},
        {"measure": "train steps/s (prefetch path)", "value": step_rate, "target": ""},
        {"measure": "loader / step rate", "value": loader / step_rate, "target": ">= 3"},
        {"measure": "data_wait_fraction, shakespeare (prefetch path)", "value": prefetch_wait, "target": "<= 0.01"},
        {"measure": "data_wait_fraction, shakespeare (as shipped)", "value": shakespeare_wait, "target": "<= 0.01"},
        {"measure": "data_wait_fraction, mnist (as shipped)", "value": mnist_wait, "target": "<= 0.01"},
    ]
    cfg = make_config(args.tiny)
    notes = (
        f"Shakespeare GPT "
        f"({cfg.gpt.num_layers} layers, {cfg.gpt.d_model} wide), batch {cfg.batch_size}x{cfg.context}; loader "
        f"timed over {steps} batches after {warmup}; training runs of {steps} steps, windows after step {warmup}. "
        "MNIST: the example's CNN, batch 128."
    )
    write_results(args.out, "input_pipeline", rows, notes, tiny=args.tiny)


if __name__ == "__main__":
    main()
