"""Activation rematerialization: memory and step time of a GPT-2-small training step, remat none
against full (and dots_saveable, which keeps the matmul outputs).

One jitted, buffer-donating step (bf16 compute, float32 weights, AdamW) per policy, each in a process
of its own so that the device's peak-memory counter belongs to that policy alone. Reported: XLA's
memory analysis of the compiled step (temporaries: the activations kept for the backward pass and
the step's scratch space), the device's ``peak_bytes_in_use`` after the steps (where the device
reports it), the step time, and the FLOPs per step from XLA's cost analysis (recomputation included).

    python -m benchmarks.remat_memory --out benchmarks/results
    python -m benchmarks.remat_memory --tiny      # a CPU check of the script; no numbers
"""

import argparse
import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import optax

from benchmarks.common import run_child_processes, write_results
from xax import peak_memory_bytes, step_flops
from xax.arch import Transformer, TransformerConfig
from xax.nn import cross_entropy

POLICIES = ("none", "dots_saveable", "full")
GB = 1e9


def model_config(tiny: bool, remat: str) -> TransformerConfig:
    base = TransformerConfig.gpt2_tiny() if tiny else TransformerConfig.gpt2_small()
    return base.with_updates(compute_dtype="float32" if tiny else "bfloat16", remat=remat)


def measure(tiny: bool, remat: str, batch: int, steps: int) -> dict[str, Any]:
    """Compiles and runs the training step under one policy; returns its memory, time and FLOPs."""
    config = model_config(tiny, remat)
    model = Transformer(config, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optimizer = optax.adamw(3e-4)
    opt_state = optimizer.init(params)
    tokens = jax.random.randint(jax.random.key(1), (batch, config.max_seq_len + 1), 0, config.vocab_size)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params: Any, opt_state: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
        def loss_fn(params: Any) -> jax.Array:
            logits, _ = eqx.combine(params, static)(tokens[:, :-1])
            return cross_entropy(logits, tokens[:, 1:])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax relies on it (as in xax's step)
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    traced = step.trace(params, opt_state, tokens)
    compiled = traced.lower().compile()
    memory = compiled.memory_analysis()
    flops = step_flops(traced)
    for _ in range(3):
        params, opt_state, loss = step(params, opt_state, tokens)
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, tokens)
    loss.block_until_ready()
    step_ms = 1000 * (time.perf_counter() - start) / steps
    peak = peak_memory_bytes(jax.local_devices()[:1])
    return {
        "remat": remat,
        "temp_gb (XLA)": memory.temp_size_in_bytes / GB,
        "arguments_gb (XLA)": memory.argument_size_in_bytes / GB,
        "device_peak_gb": "n/a" if peak is None else peak / GB,
        "step_ms": step_ms,
        "tflop_per_step": "n/a" if flops is None else flops / 1e12,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="GPT-2 small training-step memory: remat none against full")
    parser.add_argument("--batch", type=int, default=None, help="Sequences per step (default 16; 2 with --tiny)")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per policy")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"Comma-separated subset of {POLICIES}")
    parser.add_argument("--tiny", action="store_true", help="Tiny model: checks the script on CPU")
    parser.add_argument("--child", choices=POLICIES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    batch = args.batch or (2 if args.tiny else 16)
    policies = [name.strip() for name in args.policies.split(",") if name.strip()]
    if not policies or set(policies) - set(POLICIES):
        raise SystemExit(f"error: --policies {args.policies!r} must name a subset of {POLICIES}")
    if args.child is not None:
        args.result_file.write_text(json.dumps(measure(args.tiny, args.child, batch, args.steps)))
        return
    flags = ["--batch", str(batch), "--steps", str(args.steps), *(["--tiny"] if args.tiny else [])]
    results = run_child_processes("benchmarks.remat_memory", policies, flags)
    rows = [result or {"remat": remat, "temp_gb (XLA)": "failed"} for remat, result in results.items()]
    keys = list(next((row for row in rows if len(row) > 2), rows[0]))
    rows = [{key: row.get(key, "") for key in keys} for row in rows]
    config = model_config(args.tiny, "none")
    notes = (
        f"{'GPT-2 tiny' if args.tiny else 'GPT-2 small'}, batch "
        f"{batch}x{config.max_seq_len}, {config.compute_dtype} compute, AdamW, layers "
        f"{'scanned' if config.scan_layers else 'unrolled'}; {args.steps} steps timed after 3, each policy in its "
        "own process. 'full' recomputes every block in the backward pass; 'dots_saveable' keeps matmul outputs."
    )
    write_results(args.out, "remat_memory", rows, notes, tiny=args.tiny)


if __name__ == "__main__":
    main()
