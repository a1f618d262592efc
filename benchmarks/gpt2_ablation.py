"""Where GPT-2 small's training step spends its time: variants of a plain jitted step of xax's
``Transformer``, timed side by side, and a kernel-by-kernel breakdown of the device time of one.

Every variant is xax's GPT-2 small in a plain jitted step (the batch, data and AdamW of
``benchmarks.gpt2_throughput``, no Task) with one thing changed, each in a process of its own:

- ``base``: the model's defaults (a Python loop over the layers), cuDNN attention, float32
  logits then the cross-entropy;
- ``chunked``: ``chunked_cross_entropy`` instead of full float32 logits;
- ``scanned``: the layers under ``lax.scan`` (``scan_layers=True``);
- ``xla_attention``: attention in plain XLA ops instead of cuDNN's fused kernel;
- ``grad_only``: the forward and backward pass without the optimizer update;
- ``forward``: the loss alone;
- ``no_triton_gemm``: ``base`` with XLA's Triton GEMM emitter off (cuBLAS for every matmul);
- ``vocab_50304``: the vocabulary padded to a multiple of 128 (as nanoGPT and llm.c do);
- ``projected``: ``projected_cross_entropy`` (the vocabulary padded inside the loss, float32 logits);
- ``projected_bf16``: the same with bfloat16 logits, as ``torch.autocast`` computes them;
- ``projected_bf16_cublaslt``: that with XLA's cuBLASLt GEMMs, whose epilogues can take the bias
  and GELU of the MLP (``--xla_gpu_enable_cublaslt``);
- ``projected_bf16_cudnn_ln``: that with XLA rewriting LayerNorms into cuDNN's fused norm kernels
  (``--xla_gpu_enable_cudnn_layer_norm``; a jaxlib without the flag fails the variant);
- ``reference``: ``benchmarks.gpt2_reference``, GPT-2 written by hand without xax's model code (bf16
  logits, float32 cross-entropy), the throughput benchmark's JAX loop.

    python -m benchmarks.gpt2_ablation --steps 60 --warmup 15 --out benchmarks/results
    python -m benchmarks.gpt2_ablation --tiny    # a CPU check of the script; no numbers
"""

import argparse
import functools
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax
from jaxtyping import Array

from benchmarks import gpt2_reference
from benchmarks.common import reference_attention, run_child_processes, write_results
from benchmarks.gpt2_throughput import (
    gpt2_loss,
    make_optimizer,
    make_setup,
    reference_shape,
    time_steps,
    token_windows,
)
from benchmarks.profile_tools import format_with_fusions, kernel_breakdown
from xax.arch import Transformer

# name -> (model changes, loss, what the step does, extra XLA flags)
VARIANTS: dict[str, tuple[dict[str, Any], str, str, str]] = {
    "base": ({}, "full", "train", ""),
    "chunked": ({}, "chunked", "train", ""),
    "scanned": ({"scan_layers": True}, "full", "train", ""),
    "xla_attention": ({"attention_impl": "xla"}, "full", "train", ""),
    "grad_only": ({}, "full", "grad", ""),
    "forward": ({}, "full", "forward", ""),
    "no_triton_gemm": ({}, "full", "train", "--xla_gpu_enable_triton_gemm=false"),
    "vocab_50304": ({"vocab_size": 50304}, "full", "train", ""),
    "vocab_50304_no_triton": ({"vocab_size": 50304}, "full", "train", "--xla_gpu_enable_triton_gemm=false"),
    "projected": ({}, "projected", "train", ""),
    "projected_bf16": ({}, "projected_bf16", "train", ""),
    "projected_bf16_no_triton": ({}, "projected_bf16", "train", "--xla_gpu_enable_triton_gemm=false"),
    "projected_bf16_cublaslt": ({}, "projected_bf16", "train", "--xla_gpu_enable_cublaslt=true"),
    "projected_bf16_cudnn_ln": ({}, "projected_bf16", "train", "--xla_gpu_enable_cudnn_layer_norm=true"),
    "reference": ({}, "reference", "train", ""),
}


def run_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Times one variant in this process; the baseline also gets a kernel breakdown."""
    changes, loss, mode, _ = VARIANTS[name]
    setup = make_setup(args.tiny, "auto" if args.tiny else "cudnn")
    cfg = setup.model.with_updates(**changes)
    if args.tiny and "attention_impl" in changes:
        cfg = cfg.with_updates(attention_impl="xla")
    if loss == "reference":
        shape = reference_shape(cfg)
        params = gpt2_reference.init_params(shape, jax.random.key(0))
        attention = reference_attention("auto" if args.tiny else "cudnn")

        def loss_fn(params: Any, tokens: Array) -> Array:
            return gpt2_reference.loss_fn(params, tokens, shape, attention)

    else:
        params, static = eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)

        def loss_fn(params: Any, tokens: Array) -> Array:
            return gpt2_loss(eqx.combine(params, static), tokens, loss)

    optimizer = make_optimizer(setup)
    opt_state = optimizer.init(params)
    windows = jax.device_put(token_windows(setup))
    rng = np.random.default_rng(1)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train(params: Any, opt_state: Any, windows: Array, indices: Array) -> tuple[Any, Any, Array]:
        value, grads = jax.value_and_grad(loss_fn)(params, windows[indices])
        if mode == "grad":
            # Keep the gradients alive without the optimizer: one reduction over all of them.
            norm = optax.global_norm(grads)
            return params, opt_state, value + 0.0 * norm
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    @functools.partial(jax.jit, donate_argnums=())
    def forward(params: Any, opt_state: Any, windows: Array, indices: Array) -> tuple[Any, Any, Array]:
        return params, opt_state, loss_fn(params, windows[indices])

    step = forward if mode == "forward" else train
    state = [params, opt_state]

    def indices() -> np.ndarray:
        return rng.integers(0, setup.num_windows, setup.batch, dtype=np.int32)

    def one_step(_: int) -> Array:
        state[0], state[1], value = step(state[0], state[1], windows, indices())
        return value

    rate = time_steps(one_step, jax.block_until_ready, args.steps, args.warmup)
    result: dict[str, Any] = {"steps_per_s": rate}
    if name == args.profile and args.profile_steps > 0:

        def thread(out: Any, call_args: Sequence[Any]) -> Sequence[Any]:
            return (out[0], out[1], windows, indices())

        rows = kernel_breakdown(step, state[0], state[1], windows, indices(), steps=args.profile_steps, thread=thread)
        hlo = step.lower(state[0], state[1], windows, indices()).compile().as_text()
        result["breakdown"] = format_with_fusions(rows, hlo, steps=args.profile_steps, top=args.top)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="GPT-2 small step variants and a kernel breakdown")
    parser.add_argument("--steps", type=int, default=None, help="Last timed step (default 60; 6 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps (default 15; 2 with --tiny)")
    parser.add_argument("--which", default=",".join(VARIANTS), help="Comma-separated variants")
    parser.add_argument("--profile", default="base", help="The variant whose kernels are broken down")
    parser.add_argument("--profile-steps", type=int, default=5, help="Steps to profile (0: none)")
    parser.add_argument("--top", type=int, default=30, help="Kernels listed per profiler line")
    parser.add_argument("--out", type=Path, default=None, help="Results folder (default benchmarks/results)")
    parser.add_argument("--tiny", action="store_true", help="Tiny model: checks the script on CPU")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (6 if args.tiny else 60)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 15)
    if args.child is not None:
        args.result_file.write_text(json.dumps(run_variant(args.child, args)))
        return
    names = [n.strip() for n in args.which.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"error: --which names unknown variants {unknown}; choose from {list(VARIANTS)}")
    out = args.out or (Path(tempfile.mkdtemp(prefix="xax_ablation_")) if args.tiny else Path("benchmarks/results"))
    flags = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--profile-steps={args.profile_steps}"]
    flags += [f"--profile={args.profile}", f"--top={args.top}", *(["--tiny"] if args.tiny else [])]
    finished = run_child_processes(
        "benchmarks.gpt2_ablation", names, flags, extra_xla_flags=lambda name: VARIANTS[name][3]
    )
    results = {name: result or {"steps_per_s": None} for name, result in finished.items()}
    setup = make_setup(args.tiny, "auto")
    tokens = setup.batch * setup.model.max_seq_len
    base = results.get("base", {}).get("steps_per_s")
    rows = []
    for name, result in results.items():
        rate = result["steps_per_s"]
        rows.append(
            {
                "variant": name,
                "step_ms": "failed" if rate is None else 1000.0 / rate,
                "tokens_per_s": "" if rate is None else rate * tokens,
                "speed_over_base": "" if rate is None or base is None else rate / base,
            }
        )
    breakdown = results.get(args.profile, {}).get("breakdown", "")
    notes = (
        f"GPT-2 small hand-written JAX step variants "
        f"(batch {setup.batch}x{setup.model.max_seq_len}, bf16 compute, AdamW), steps {args.warmup}..{args.steps} "
        f"timed, each in its own process.\n\n## Device time of `{args.profile}` by kernel\n{breakdown}"
    )
    write_results(out, "gpt2_ablation", rows, notes, tiny=args.tiny)


if __name__ == "__main__":
    main()
