"""The Shakespeare example's step rate through xax's Task loop against a hand-written jitted loop, and
the cost of logging every step instead of every 100.

Same model (examples/shakespeare.py's GPT), batch, optimizer (AdamW with warmup-cosine, clipped at
norm 1, weight decay on matrices), bf16 compute with float32 weights, and data (the training windows
kept on the device, a batch gathered by index inside the step). xax runs with its default loggers
(stdout, JSONL, TensorBoard; CPU and GPU stats).

    python -m benchmarks.shakespeare_overhead --steps 600 --warmup 100 --out benchmarks/results
    python -m benchmarks.shakespeare_overhead --tiny      # a CPU check of the script; no numbers
"""

import argparse
import functools
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import xax
from benchmarks.common import quiet_run_argv, steps_per_second_after, write_results
from examples.shakespeare import Config, GPTOptions, Shakespeare
from xax import PrecisionOptions
from xax.nn import cast_floating, cross_entropy


def make_config(tiny: bool) -> Config:
    """The example's config, or a one-layer, 32-wide GPT in float32 (a CPU check)."""
    if not tiny:
        return Config()
    return Config(
        context=32,
        batch_size=8,
        gpt=GPTOptions(num_layers=1, d_model=32, num_heads=2),
        num_chars=8,
        precision=PrecisionOptions(compute_dtype="float32"),
    )


def hand_written(config: Config, steps: int, warmup: int) -> float:
    """Steps per second of a plain jitted loop between step ``warmup`` and step ``steps``."""
    task = Shakespeare(config)
    windows = task.get_dataset("train").with_format("numpy")[:]
    tokens_all = jax.device_put(np.asarray(windows["tokens"], np.int32))
    targets_all = jax.device_put(np.asarray(windows["targets"], np.int32))
    model = task.get_model(xax.InitParams(key=jax.random.key(0)))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm or math.inf), task.get_optimizer())
    with jax.numpy_dtype_promotion("standard"):  # optax relies on it (as in xax's step)
        opt_state = optimizer.init(params)
    dtype = jnp.dtype(config.precision.compute_dtype)

    def loss_fn(params: Any, tokens: jax.Array, targets: jax.Array, key: jax.Array) -> jax.Array:
        model = eqx.combine(cast_floating(params, dtype), static)
        return cross_entropy(model(tokens, key=key)[0], targets)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params: Any, opt_state: Any, key: jax.Array, indices: jax.Array) -> tuple[Any, Any, jax.Array, jax.Array]:
        key, step_key = jax.random.split(key)
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens_all[indices], targets_all[indices], step_key)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return params, opt_state, key, loss

    rng = np.random.default_rng(0)
    num, batch = len(windows["tokens"]), config.batch_size
    key = jax.random.key(1)
    start = time.perf_counter()
    for i in range(steps):
        indices = rng.choice(num, batch, replace=False).astype(np.int32)
        params, opt_state, key, loss = step(params, opt_state, key, indices)
        if i + 1 == warmup:
            loss.block_until_ready()
            start = time.perf_counter()
    jax.block_until_ready(params)
    return (steps - warmup) / (time.perf_counter() - start)


def xax_loop(config: Config, steps: int, warmup: int, log_every: int) -> float:
    """Steps per second of the example's task between step ``warmup`` and step ``steps``."""
    with tempfile.TemporaryDirectory() as run_dir:
        argv = [*quiet_run_argv(run_dir, steps), f"log.every_n_steps={log_every}"]
        Shakespeare.launch(config, argv=argv)
        return steps_per_second_after(Path(run_dir), warmup)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Shakespeare GPT: xax's loop against a hand-written one")
    parser.add_argument("--steps", type=int, default=None, help="Last timed step (default 600; 24 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps first (default 100; 8 with --tiny)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tiny", action="store_true", help="Tiny model and batch: checks the script on CPU")
    args = parser.parse_args(argv)
    steps = args.steps or (24 if args.tiny else 600)
    warmup = args.warmup or (8 if args.tiny else 100)
    if not 0 < warmup < steps or warmup % 4:
        raise SystemExit(f"error: need 0 < --warmup < --steps and --warmup a multiple of 4, got {warmup}, {steps}")
    config = make_config(args.tiny)
    rates = {
        "hand_written": hand_written(config, steps, warmup),
        "xax_log_every_100": xax_loop(config, steps, warmup, math.gcd(100, warmup)),
        "xax_log_every_step": xax_loop(config, steps, warmup, 1),
    }
    rows = [
        {"loop": "hand_written", "steps_per_s": rates["hand_written"], "ratio": 1.0, "target": ""},
        {
            "loop": "xax (log every 100)",
            "steps_per_s": rates["xax_log_every_100"],
            "ratio": rates["xax_log_every_100"] / rates["hand_written"],
            "target": ">= 0.97 x hand_written",
        },
        {
            "loop": "xax (log every step)",
            "steps_per_s": rates["xax_log_every_step"],
            "ratio": rates["xax_log_every_step"] / rates["xax_log_every_100"],
            "target": "<= 1.05 x slower than every 100 (ratio >= 0.952)",
        },
    ]
    gpt = config.gpt
    notes = (
        f"Shakespeare GPT ({gpt.num_layers} layers, "
        f"{gpt.d_model} wide, context {config.context}), batch {config.batch_size}, {config.precision.compute_dtype} "
        f"compute, AdamW; steps {warmup}..{steps} timed. The 'log every 100' run logs every "
        f"{math.gcd(100, warmup)} steps when --warmup is not a multiple of 100."
    )
    write_results(args.out, "shakespeare_overhead", rows, notes, tiny=args.tiny)


if __name__ == "__main__":
    main()
