"""xax's MNIST training step rate against hand-written jitted JAX loops, side by side in one run.

Same model (examples/mnist.py's CNN), batch, optimizer (AdamW with warmup-cosine) and data. xax runs
with its default logging (stdout, JSONL, TensorBoard every 100 steps; CPU and GPU stats). The
hand-written loops are (a) the data kept on the device and gathered inside the jitted step, the
fastest way to feed MNIST, and (b) host batches indexed from numpy and put on the device each step.

    python -m benchmarks.mnist_overhead --steps 3000 --warmup 500 --out benchmarks/results
    python -m benchmarks.mnist_overhead --tiny      # a CPU check of the script; no numbers
"""

import argparse
import functools
import math
import tempfile
import time
import typing
from collections.abc import Sequence
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import steps_per_second_after, write_results
from examples.mnist import CNN, PIXEL_MEAN, PIXEL_STD, Config, MnistClassification
from examples.mnist_data import load_mnist

BATCH = 128


def make_optimizer(config: Config, total: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, min(config.warmup_steps, total // 2), total
    )
    return optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, weight_decay=config.weight_decay)


def loss_fn(params: eqx.Module, static: eqx.Module, images: jax.Array, labels: jax.Array, key: jax.Array) -> jax.Array:
    model = typing.cast(CNN, eqx.combine(params, static))
    x = (images.astype(jnp.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD
    keys = jax.random.split(key, x.shape[0])
    logits = jax.vmap(lambda image, k: model(image[None], key=k))(x, keys)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def hand_written(steps: int, warmup: int, on_device: bool) -> float:
    """Steps per second of a plain jitted loop between step ``warmup`` and step ``steps``."""
    config = Config()
    data = load_mnist("train").with_format("numpy")[:]
    images_np, labels_np = data["image"], data["label"].astype(np.int32)
    model = CNN(config.channels, config.hidden, config.dropout, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    optimizer = make_optimizer(config, steps)
    with jax.numpy_dtype_promotion("standard"):  # optax relies on it (as in xax's step)
        opt_state = optimizer.init(params)
    key = jax.random.key(1)

    def update(params, opt_state, key, images, labels):
        key, step_key = jax.random.split(key)
        loss, grads = jax.value_and_grad(loss_fn)(params, static, images, labels, step_key)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, loss

    step = jax.jit(update, donate_argnums=(0, 1, 2))

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step_gather(params, opt_state, key, all_images, all_labels, indices):
        return update(params, opt_state, key, all_images[indices], all_labels[indices])

    all_images, all_labels = jax.device_put(images_np), jax.device_put(labels_np)
    per_epoch = len(images_np) // BATCH
    order = np.random.default_rng(0).permutation(len(images_np))
    start = 0.0
    for i in range(steps):
        if i % per_epoch == 0:
            order = np.random.default_rng(i).permutation(len(images_np))
        idx = order[(i % per_epoch) * BATCH : (i % per_epoch + 1) * BATCH]
        if on_device:
            params, opt_state, key, loss = step_gather(params, opt_state, key, all_images, all_labels, idx)
        else:
            params, opt_state, key, loss = step(params, opt_state, key, jax.device_put(images_np[idx]), labels_np[idx])
        if i + 1 == warmup:
            loss.block_until_ready()
            start = time.perf_counter()
    loss.block_until_ready()
    return (steps - warmup) / (time.perf_counter() - start)


def xax_loop(steps: int, warmup: int) -> float:
    """Steps per second of the example's task between step ``warmup`` and step ``steps``."""
    with tempfile.TemporaryDirectory() as run_dir:
        argv = [
            f"artifacts.run_dir={run_dir}",
            "valid_every_n_steps=null",
            "log.every_n_seconds=null",
            f"log.every_n_steps={math.gcd(100, warmup)}",  # xax's default, when it divides the warmup
        ]
        MnistClassification.launch(Config(batch_size=BATCH, max_steps=steps), argv=argv)
        return steps_per_second_after(Path(run_dir), warmup)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="MNIST: xax's loop against hand-written jitted loops")
    parser.add_argument("--steps", type=int, default=None, help="Last timed step (default 3000; 30 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps first (default 500; 10 with --tiny)")
    parser.add_argument("--repeats", type=int, default=None, help="Runs of each loop (default 2; 1 with --tiny)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tiny", action="store_true", help="A few steps: checks the script on CPU")
    args = parser.parse_args(argv)
    args.steps = args.steps or (30 if args.tiny else 3000)
    args.warmup = args.warmup or (10 if args.tiny else 500)
    args.repeats = args.repeats or (1 if args.tiny else 2)
    runs: dict[str, list[float]] = {"hand_written_device_data": [], "hand_written_host_data": [], "xax": []}
    for _ in range(args.repeats):
        runs["hand_written_device_data"].append(hand_written(args.steps, args.warmup, on_device=True))
        runs["hand_written_host_data"].append(hand_written(args.steps, args.warmup, on_device=False))
        runs["xax"].append(xax_loop(args.steps, args.warmup))
    best = {name: max(values) for name, values in runs.items()}
    reference = best["hand_written_device_data"]
    rows = [
        {
            "loop": name,
            "steps_per_s (best)": best[name],
            "all runs": ", ".join(f"{v:.0f}" for v in values),
            "ratio_vs_hand_written_device_data": best[name] / reference,
        }
        for name, values in runs.items()
    ]
    notes = (
        f"MNIST CNN, batch {BATCH}, AdamW, float32; steps {args.warmup}..{args.steps} timed, best of {args.repeats}. "
        "Target: xax at least 0.97x the hand-written loop with default logging on."
    )
    write_results(args.out, "mnist_overhead", rows, notes, tiny=args.tiny)


if __name__ == "__main__":
    main()
