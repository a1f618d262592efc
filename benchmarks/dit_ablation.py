"""Where DiT-B/2's training step spends its time: variants of xax's step timed side by side in one
process on one GPU, and a kernel-by-kernel breakdown of the device time of the fastest.

Every variant trains xax's ``DiT`` weights (or, for ``reference``, the hand-written model of
``benchmarks.dit_reference``) on the batch, loss and optimizer of ``benchmarks.dit_throughput``
(batch 256 of 32x32x4 latents, eps prediction with label dropout, AdamW, float32 weights cast to
bfloat16 in the step), in a jitted step that donates its state and gathers its batch on the
device. Each is compiled ahead of time (``compile_s``), warmed up, then timed.

- ``xax``: the library's ``DiT.__call__`` as configured by ``dit_throughput`` (blocks in a Python
  loop over static slices of the stacked weights, vmapped over the batch, cuDNN attention);
- ``xax_autodiff_gelu``: ``xax`` with the MLP's GELU differentiated by JAX (the library's
  ``gelu_tanh`` before its custom backward), the control for it; ``xax_autodiff_ln`` the same for
  the LayerNorm (``xax.nn.norms.layer_norm`` before its custom backward); ``xax_autodiff`` both;
- ``xax_scan``, ``xax_xla_attention``, ``xax_remat_off``, ``xax_remat_dots``: the same with
  ``scan_layers=True``, ``attention_impl="xla"``, ``remat="none"`` (skipped when it is the
  default) or ``remat="dots_saveable"``;
- ``batched``: the library's math (its weights, float32 LayerNorm statistics, bf16 adaLN
  modulation and residual stream, conv patch embedding) written in this file over the whole batch
  ``(B, T, D)`` instead of vmapped per image, attention in ``(B, T, heads, head_dim)`` with no
  transpose; each ``batched_*`` variant changes one thing of it (``Options``):
  ``_separate`` (a tuple of per-block weights instead of slices of stacked ones, so no gradient is
  padded back into a stacked array), ``_qkv_split`` (q, k and v from three matmuls, each
  contiguous, instead of slices of one fused output), ``_xla_attention``, ``_per_image_attention``
  (cuDNN on ``(1, T, heads, head_dim)`` vmapped over the images, the library's layout),
  ``_ln_bf16`` (LayerNorm arithmetic in bf16), ``_mod_f32`` (LayerNorm output and adaLN
  modulation in float32, cast to bf16 at the matmul, as ``torch.autocast`` computes them),
  ``_residual_f32`` (a float32 residual stream), ``_patch_linear`` (patchify as a reshape and one
  matmul instead of a strided convolution);
- ``combined``: ``batched`` with every option whose variant beat ``batched`` by more than 1%;
- ``reference``: ``benchmarks.dit_reference`` (written without xax's model code);
- ``VARIANT+SET`` (e.g. ``xax+cublaslt``): the variant compiled under XLA options
  (``XLA_FLAG_SETS``), each in a child process started before this one touches the GPU;
  ``xax+default`` is the same child process with no extra flag, their control.

``over_xax`` is a variant's speed over ``xax``'s. A variant that lowers to the same program as
one timed before it is reported as such and not compiled again; with ``--budget-s``, variants that
would start after the budget are reported as skipped. The fastest variant other than
``reference``, and ``reference``, then get a kernel breakdown (``benchmarks/profile_tools.py``).
Results are rewritten after every variant, so a run cut short keeps what it measured.

What the lowered steps hold (``--check-hlo``: each step traced and lowered for CUDA from a CPU
machine, not run, at DiT-B/2's shapes with a batch of 2; counts over the jaxpr, where a scanned
body counts once, and the StableHLO):

- No float32 matmul where bf16 was meant. With cuDNN attention every ``dot_general`` of every
  variant takes bf16 and gives bf16 (191 in ``xax`` and ``batched``, forward and backward).
  ``xax_xla_attention`` (the library's XLA attention) adds only its 12 score matmuls with float32
  results, by design. ``batched_xla_attention`` (``jax.nn``'s XLA attention) has those 12 and 24
  float32 x bf16 -> float32 matmuls in the backward: ``jax.nn`` multiplies the float32 score
  gradient by the bf16 q and k, the float32 GEMMs the library's own XLA attention avoids.
- Transposes around attention: the lowering of ``jax.nn.dot_product_attention(implementation=
  "cudnn")`` itself transposes cuDNN's ``(B, heads, T, head_dim)`` output and three input
  gradients to ``(B, T, heads, head_dim)``: 4 per block, 48 per step, in every cuDNN variant, the
  reference included; the caller's layout does not change them (``batched`` gives cuDNN
  ``(B, T, heads, head_dim)`` from a reshape, with no transpose of its own, and the library's
  per-image ``(1, T, heads, head_dim)`` vmapped over the batch lowers to the same calls).
- Transposes around the linears: the library's model is written per image and vmapped over the
  batch, and a vmapped ``eqx.nn.Linear`` computes ``(out, B, T)`` and transposes it back: ``xax``
  has 98 activation-sized transposes in its jaxpr against 50 for ``batched`` (in the StableHLO,
  ``(768|2304|3072, B, 256)`` <-> ``(B, 256, 768|2304|3072)`` around the qkv, projection and MLP
  matmuls of every block, forward and backward). Whether XLA folds them into the GEMMs' layouts is
  what ``xax`` against ``batched`` measures.
- Gradient pads of stacked weights: in ``xax``, ``xax_remat_dots`` and ``batched`` (and its
  one-change variants but ``_separate``) each block takes static slices of the stacked weights, and
  the gradient of each slice is a ``pad`` back to the whole ``(12, ...)`` array: 120 pads (10
  arrays x 12 blocks), each as large as the stacked array (the modulation's 12 x 4608 x 768), then
  summed. ``batched_separate`` and ``reference`` have none; ``xax_scan`` none either (the scan
  stacks the per-block gradients itself, and its forward residuals).
- Copies: no ``copy`` in any jaxpr. The fused qkv output split in three (``jnp.split``) gives one
  activation-sized ``concatenate`` per block in the backward (the reference's ``(B, T, 3, heads,
  head_dim)`` indexing gives three pads instead); ``batched_qkv_split`` has neither (its weight
  slices' gradients are pads of weight size).
- ``xax_remat_dots`` recomputes cuDNN's forward in the backward (24 forward calls, not 12): the
  fused attention is not a dot that ``dots_saveable`` keeps.

    python -m benchmarks.dit_ablation --out benchmarks/results            # on a GPU (about 5 minutes)
    python -m benchmarks.dit_ablation --tiny                              # every variant on CPU, no numbers
    python -m benchmarks.dit_ablation --check-hlo                         # the lowered steps, no execution
"""

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from benchmarks import dit_reference
from benchmarks.common import run_child_processes, write_results
from benchmarks.dit_throughput import (
    LABEL_DROP,
    Setup,
    dit_loss,
    make_optimizer,
    make_schedule,
    make_setup,
    random_latents,
    reference_shape,
)
from benchmarks.gpt2_throughput import time_steps
from benchmarks.profile_tools import format_with_fusions, kernel_breakdown
from xax.arch import DiT
from xax.arch.diffusion import diffusion_loss, drop_labels, sincos_2d


@dataclass(frozen=True)
class Options:
    """How ``Batched`` computes xax's DiT; the defaults are the library's math, batched.

    Attributes:
        blocks: "stacked" (static slices of the stacked weights) or "separate" (a tuple of blocks).
        qkv: "fused" (one matmul, then slices) or "split" (three matmuls).
        attention: ``jax.nn.dot_product_attention``'s implementation, "cudnn" or "xla" (CPU runs
            take "xla" for "cudnn").
        attention_layout: "batched" (``(B, T, heads, head_dim)``) or "per_image" (``(1, T, heads,
            head_dim)`` vmapped over the batch, as the library's per-image model gives it).
        layer_norm: "f32" (statistics in float32, as the library) or "bf16".
        modulation: "bf16" (the library) or "f32" (LayerNorm output and modulation in float32).
        residual: "bf16" (the library) or "f32".
        patch: "conv" (the library's strided convolution) or "linear" (patchify and a matmul).
    """

    blocks: str = "stacked"
    qkv: str = "fused"
    attention: str = "cudnn"
    attention_layout: str = "batched"
    layer_norm: str = "f32"
    modulation: str = "bf16"
    residual: str = "bf16"
    patch: str = "conv"


@dataclass(frozen=True)
class Variant:
    """One timed step: ``model`` is "xax" (``DiT.__call__``), "batched" or "reference"."""

    model: str
    config: tuple[tuple[str, Any], ...] = ()
    options: Options = Options()
    autodiff_gelu: bool = False
    autodiff_ln: bool = False


def autodiff_layer_norm(x: Array, eps: float = 1e-6) -> Array:
    """The DiT blocks' LayerNorm as JAX differentiates it (which saves the centred input and its
    scaled copy in float32), the library's before ``xax.nn.norms.layer_norm`` had its own backward."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    var = jnp.mean((x32 - mean) ** 2, axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def gelu_of(variant: Variant) -> contextlib.AbstractContextManager[Any]:
    """While tracing a variant with ``autodiff_gelu`` (``autodiff_ln``), the library's MLPs take JAX's
    GELU differentiated by JAX (which saves a residual of its tanh) instead of ``xax.nn.mlp.gelu_tanh``
    (which saves its input), and its DiT blocks ``autodiff_layer_norm`` instead of their LayerNorm."""
    stack = contextlib.ExitStack()
    if variant.autodiff_gelu:
        autodiff = functools.partial(jax.nn.gelu, approximate=True)
        stack.enter_context(mock.patch.dict("xax.nn.mlp.ACTIVATIONS", {"gelu_tanh": autodiff}))
    if variant.autodiff_ln:
        stack.enter_context(mock.patch("xax.arch.dit.layer_norm", autodiff_layer_norm))
    return stack


BATCHED_CHANGES: dict[str, dict[str, str]] = {
    "separate": {"blocks": "separate"},
    "qkv_split": {"qkv": "split"},
    "xla_attention": {"attention": "xla"},
    "per_image_attention": {"attention_layout": "per_image"},
    "ln_bf16": {"layer_norm": "bf16"},
    "mod_f32": {"modulation": "f32"},
    "residual_f32": {"residual": "f32"},
    "patch_linear": {"patch": "linear"},
}

# In the order they run, the most telling first should the time budget run out.
VARIANTS: dict[str, Variant] = {
    "xax": Variant("xax"),
    "reference": Variant("reference"),
    "batched": Variant("batched"),
    "batched_separate": Variant("batched", options=Options(blocks="separate")),
    "batched_qkv_split": Variant("batched", options=Options(qkv="split")),
    "xax_autodiff_gelu": Variant("xax", autodiff_gelu=True),
    "xax_autodiff_ln": Variant("xax", autodiff_ln=True),
    "xax_autodiff": Variant("xax", autodiff_gelu=True, autodiff_ln=True),
    "xax_scan": Variant("xax", config=(("scan_layers", True),)),
    "batched_mod_f32": Variant("batched", options=Options(modulation="f32")),
    "batched_ln_bf16": Variant("batched", options=Options(layer_norm="bf16")),
    "batched_residual_f32": Variant("batched", options=Options(residual="f32")),
    "batched_patch_linear": Variant("batched", options=Options(patch="linear")),
    "batched_per_image_attention": Variant("batched", options=Options(attention_layout="per_image")),
    "xax_xla_attention": Variant("xax", config=(("attention_impl", "xla"),)),
    "batched_xla_attention": Variant("batched", options=Options(attention="xla")),
    "xax_remat_off": Variant("xax", config=(("remat", "none"),)),
    "xax_remat_dots": Variant("xax", config=(("remat", "dots_saveable"),)),
}
assert {f"batched_{name}" for name in BATCHED_CHANGES} <= set(VARIANTS)

# XLA options, timed as ``VARIANT+SET`` (``xax+cublaslt``): the variant's step compiled in a process
# of its own whose ``XLA_FLAGS`` end with the set's flags (XLA reads them once, when it starts).
# ``default`` adds nothing: the same separate process, the control for the others.
XLA_FLAG_SETS: dict[str, str] = {
    "default": "",
    "cublaslt": "--xla_gpu_enable_cublaslt=true",
    "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
    "cudnn_layer_norm": "--xla_gpu_enable_cudnn_layer_norm=true",
    "exhaustive_tiling": "--xla_gpu_exhaustive_tiling_search=true",
}


def split_name(name: str) -> tuple[Variant, str | None]:
    """The variant and XLA flag set of a ``--which`` name (``xax`` or ``xax+cublaslt``)."""
    base, plus, flag_set = name.partition("+")
    if base not in VARIANTS or (plus and flag_set not in XLA_FLAG_SETS):
        raise KeyError(name)
    return VARIANTS[base], flag_set if plus else None


# ---- the batched forward over xax's weights ------------------------------------------------------


def dense(layer: eqx.nn.Linear, x: Array) -> Array:
    """An ``eqx.nn.Linear`` (weight ``(out, in)``) over the last axis of ``x``, no transpose op."""
    out = jax.lax.dot_general(x, layer.weight, (((x.ndim - 1,), (1,)), ((), ())))
    bias = layer.bias
    assert bias is not None
    return out + bias.reshape((1,) * (x.ndim - 1) + bias.shape)


def layer_norm(x: Float[Array, "b t d"], dtype: str, out_dtype: Any) -> Array:
    """Affine-free LayerNorm (eps 1e-6); "f32" computes in float32 as the library, "bf16" in ``x``'s dtype."""
    xc = x.astype(jnp.float32) if dtype == "f32" else x
    mean = xc.mean(axis=-1, keepdims=True)
    var = jnp.square(xc - mean).mean(axis=-1, keepdims=True)
    return ((xc - mean) * jax.lax.rsqrt(var + 1e-6)).astype(out_dtype)


def modulate(x: Array, shift: Float[Array, "b d"], scale: Float[Array, "b d"]) -> Array:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def attend(q: Array, k: Array, v: Array, num_heads: int, impl: Any, layout: str) -> Array:
    """Softmax attention of ``(B, T, D)`` q, k, v split into heads; see ``Options.attention``."""
    b, t, d = q.shape
    heads = lambda a: a.reshape(b, t, num_heads, d // num_heads)  # noqa: E731  (B, T, heads, head_dim)
    if layout == "per_image":

        def one(q1: Array, k1: Array, v1: Array) -> Array:  # (1, T, heads, head_dim) each
            return jax.nn.dot_product_attention(q1, k1, v1, implementation=impl)

        out = jax.vmap(one)(heads(q)[:, None], heads(k)[:, None], heads(v)[:, None])[:, 0]
    else:
        out = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), implementation=impl)
    return out.reshape(b, t, d)


class Batched(eqx.Module):
    """xax's DiT weights applied to the whole batch at once, with ``Options`` changing one thing."""

    dit: DiT  # its ``blocks`` is None: they are held below
    blocks: Any  # the stacked DiTBlock, or a tuple of unstacked ones
    options: Options = eqx.field(static=True)

    @classmethod
    def from_dit(cls, dit: DiT, options: Options) -> "Batched":
        """``dit``'s weights, its blocks held here (once: a donated step must not see them twice)."""
        stacked = dit.blocks
        blocks = tuple(dit.block(i) for i in range(dit.config.num_layers)) if options.blocks == "separate" else stacked
        return cls(eqx.tree_at(lambda m: m.blocks, dit, None), blocks, options)

    def block(self, index: int) -> Any:
        if isinstance(self.blocks, tuple):
            return self.blocks[index]
        return jax.tree.map(lambda a: a[index], self.blocks)  # a static slice, as the library's loop

    def __call__(self, x: Float[Array, "b c h w"], t: Float[Array, " b"], y: Int[Array, " b"]) -> Array:
        opts, dit = self.options, self.dit
        cfg = dit.config
        dtype = x.dtype
        residual = jnp.float32 if opts.residual == "f32" else dtype
        b, p, g = x.shape[0], cfg.patch_size, cfg.input_size // cfg.patch_size
        if opts.patch == "linear":
            weight = dit.patch_embed.weight  # (D, C, p, p)
            patches = x.reshape(b, cfg.in_channels, g, p, g, p).transpose(0, 2, 4, 3, 5, 1)  # (B, g, g, p, p, C)
            patches = patches.reshape(b, g * g, p * p * cfg.in_channels)
            kernel = weight.transpose(0, 2, 3, 1).reshape(cfg.d_model, p * p * cfg.in_channels)  # (D, p p C)
            tokens = jax.lax.dot_general(patches, kernel, (((2,), (1,)), ((), ())))
            bias = dit.patch_embed.bias
            assert bias is not None
            tokens = tokens + bias.reshape(1, 1, cfg.d_model)
        else:
            tokens = jax.vmap(dit.patch_embed)(x).reshape(b, cfg.d_model, g * g).transpose(0, 2, 1)  # (B, T, D)
        tokens = (tokens + jnp.asarray(sincos_2d(cfg.d_model, g, g), dtype)[None]).astype(residual)
        c = jax.vmap(dit.condition)(t, y).astype(dtype)  # (B, D)
        for index in range(cfg.num_layers):
            tokens = self.apply_block(self.block(index), tokens, c)
        final = dit.final
        shift, scale = jnp.split(dense(final.modulation, jax.nn.silu(c)), 2, axis=-1)
        out = dense(final.linear, self.norm_modulate(tokens, shift, scale))  # (B, T, p * p * C_out)
        channels = out.shape[-1] // (p * p)
        out = out.reshape(b, g, g, p, p, channels).transpose(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return out.reshape(b, channels, cfg.input_size, cfg.input_size)

    def norm_modulate(self, x: Array, shift: Array, scale: Array) -> Array:
        """``modulate(LN(x), shift, scale)`` in the compute dtype, or float32 then cast ("f32")."""
        compute = shift.dtype
        if self.options.modulation == "f32":
            f32 = jnp.float32
            normed = layer_norm(x, self.options.layer_norm, f32)
            return modulate(normed, shift.astype(f32), scale.astype(f32)).astype(compute)
        return modulate(layer_norm(x, self.options.layer_norm, compute), shift, scale)

    def apply_block(self, blk: Any, x: Array, c: Float[Array, "b d"]) -> Array:
        """``x += g1 attn(mod(LN(x))); x += g2 mlp(mod(LN(x)))`` as ``DiTBlock``, batched."""
        opts = self.options
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(dense(blk.modulation, jax.nn.silu(c)), 6, axis=-1)
        h = self.norm_modulate(x, shift1, scale1)
        if opts.qkv == "split":
            w, bias = blk.qkv.weight, blk.qkv.bias
            d = w.shape[1]
            q, k, v = (
                jax.lax.dot_general(h, w[i * d : (i + 1) * d], (((2,), (1,)), ((), ())))
                + bias[i * d : (i + 1) * d].reshape(1, 1, d)
                for i in range(3)
            )
        else:
            q, k, v = jnp.split(dense(blk.qkv, h), 3, axis=-1)
        attended = attend(q, k, v, self.dit.config.num_heads, opts.attention, opts.attention_layout)
        attended = dense(blk.proj, attended)
        x = x + (gate1[:, None, :] * attended).astype(x.dtype)
        mlp = blk.mlp(self.norm_modulate(x, shift2, scale2))  # the library's MLP, over (B, T)
        return x + (gate2[:, None, :] * mlp).astype(x.dtype)


def batched_loss(model: Batched, latents: Array, labels: Array, key: Array, schedule: Any) -> Array:
    """``dit_throughput.dit_loss`` for ``Batched``: the same noising, label dropout and error."""
    cfg = model.dit.config
    drop_key, loss_key = jax.random.split(key)
    x0 = latents.reshape(-1, cfg.in_channels, cfg.input_size, cfg.input_size)  # (B, C, H, W)
    y = drop_labels(labels, drop_key, LABEL_DROP, model.dit.null_label)
    dtype = model.dit.patch_embed.weight.dtype

    def denoiser(x_t: Array, t: Array) -> Array:
        return model(x_t.astype(dtype), t, y).astype(jnp.float32)

    return diffusion_loss(denoiser, schedule, x0, loss_key)


# ---- building and timing a variant ---------------------------------------------------------------

# A jitted step ``(params, opt_state, key, latents, labels, indices) -> (params, opt_state, key, loss)``
# (``jax.jit``'s wrapper, with ``lower`` and ``trace``).
Step = Any


def is_leaf_array(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def build(variant: Variant, setup: Setup, gpu: bool, abstract: bool = False) -> tuple[Step, list[Any]]:
    """The jitted step ``(params, opt_state, key, latents, labels, indices) -> (params, opt_state,
    key, loss)`` and its initial ``[params, opt_state, key]`` (shapes only when ``abstract``)."""
    optimizer = make_optimizer(setup)
    make = jax.eval_shape if abstract else (lambda f: f())
    if variant.model == "reference":
        shape = reference_shape(setup.model)
        attention = "cudnn" if gpu and setup.model.attention_impl != "xla" else "xla"
        params = make(lambda: dit_reference.init_params(shape, jax.random.key(0)))
        return dit_reference.make_train_step(shape, optimizer, attention), init_state(optimizer, params, make)
    config = dataclasses.replace(setup.model, **dict(variant.config))
    options = variant.options
    if not gpu and options.attention == "cudnn":
        options = dataclasses.replace(options, attention="xla")

    def model() -> Any:
        dit = DiT(config, key=jax.random.key(0))
        return dit if variant.model == "xax" else Batched.from_dit(dit, options)

    tree = eqx.filter_eval_shape(model) if abstract else model()
    params, static = eqx.partition(tree, is_leaf_array)
    loss = dit_loss if variant.model == "xax" else batched_loss
    schedule = make_schedule(setup)

    def loss_fn(params: Any, latents: Array, labels: Array, key: Array) -> Array:
        low = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
        return loss(eqx.combine(low, static), latents, labels, key, schedule)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params: Any, opt_state: Any, key: Array, latents: Array, labels: Array, indices: Array) -> tuple:
        key, step_key = jax.random.split(key)
        value, grads = jax.value_and_grad(loss_fn)(params, latents[indices], labels[indices], step_key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, value

    return step, init_state(optimizer, params, make)


def init_state(optimizer: optax.GradientTransformation, params: Any, make: Callable[[Any], Any]) -> list[Any]:
    return [params, make(lambda: optimizer.init(params)), make(lambda: jax.random.key(1))]


@dataclass
class Timed:
    """A timed variant whose compiled step and state are kept for a kernel breakdown."""

    rate: float
    compiled: Any
    state: list[Any]
    indices: Callable[[], np.ndarray]


def time_variant(
    name: str,
    variant: Variant,
    setup: Setup,
    data: tuple[Array, Array],
    args: argparse.Namespace,
    programs: dict[str, str],
) -> tuple[dict[str, Any], Timed | None]:
    """Compiles and times one variant; returns its row's measurements and what a profile needs.

    ``programs`` maps each lowered program already timed to its variant: a variant that lowers to
    one of them is reported as the same and not compiled again.
    """
    with gelu_of(variant):
        step, state = build(variant, setup, jax.default_backend() == "gpu")
    rng = np.random.default_rng(1)

    def indices() -> np.ndarray:
        return rng.integers(0, setup.num_samples, setup.batch, dtype=np.int32)

    start = time.perf_counter()
    with gelu_of(variant):
        lowered = step.lower(*state, *data, indices())
    program = lowered.as_text()
    if program in programs:
        return {"status": f"same program as {programs[program]}"}, None
    programs[program] = name
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    loss: list[Array] = []

    def one_step(_: int) -> Array:
        state[0], state[1], state[2], value = compiled(*state, *data, indices())
        loss[:] = [value]
        return value

    rate = time_steps(one_step, jax.block_until_ready, args.steps, args.warmup)
    row = {"steps_per_s": rate, "compile_s": compile_s, "last_loss": float(loss[0])}
    return row, Timed(rate, compiled, state, indices)


def profile(timed: Timed, data: tuple[Array, Array], args: argparse.Namespace) -> str:
    """The kernel breakdown of ``args.profile_steps`` steps of a timed variant."""

    def thread(out: Any, _: Sequence[Any]) -> Sequence[Any]:
        return (out[0], out[1], out[2], *data, timed.indices())

    rows = kernel_breakdown(
        timed.compiled, *timed.state, *data, timed.indices(), steps=args.profile_steps, thread=thread
    )
    return format_with_fusions(rows, timed.compiled.as_text(), steps=args.profile_steps, top=args.top)


def combined_variant(results: dict[str, dict[str, Any]]) -> Variant | None:
    """``batched`` with every option whose variant beat ``batched`` by more than 1%; None if none did."""
    base = results.get("batched", {}).get("steps_per_s")
    if not isinstance(base, float):
        return None
    changes: dict[str, str] = {}
    for name, change in BATCHED_CHANGES.items():
        rate = results.get(f"batched_{name}", {}).get("steps_per_s")
        if isinstance(rate, float) and rate > 1.01 * base and not set(change) & set(changes):
            changes.update(change)
    return Variant("batched", options=Options(**changes)) if changes else None


# ---- the run -------------------------------------------------------------------------------------


def report(
    args: argparse.Namespace, setup: Setup, results: dict[str, dict[str, Any]], breakdowns: dict[str, str]
) -> None:
    base = results.get("xax", results.get("xax+default", {})).get("steps_per_s")
    rows = []
    for name, result in results.items():
        rate = result.get("steps_per_s")
        measured = isinstance(rate, float)
        rows.append(
            {
                "variant": name,
                "steps_per_s": rate if measured else result.get("status", "failed"),
                "images_per_s": rate * setup.batch if measured else "",
                "step_ms": 1000.0 / rate if measured else "",
                "over_xax": rate / base if measured and isinstance(base, float) else "",
                "compile_s": result.get("compile_s", ""),
                "last_loss": result.get("last_loss", ""),
                "xla_flags": result.get("xla_flags", ""),
            }
        )
    combined = results.get("combined", {}).get("options", "")
    notes = (
        f"DiT ({setup.model.num_layers} blocks, width {setup.model.d_model}, patch {setup.model.patch_size}) "
        f"training-step variants (batch {setup.batch}, {setup.model.input_size}x{setup.model.input_size}x"
        f"{setup.model.in_channels} latents, bf16 compute, float32 weights, AdamW), in one process "
        "(each VARIANT+SET in a child process of its own); "
        f"steps {args.warmup}..{args.steps} timed after an ahead-of-time compile. See the module docstring of "
        f"benchmarks/dit_ablation.py for what each variant changes.{' combined: ' + combined if combined else ''}"
        f"\n\nCommand: `{args.command}`"
    )
    for name, table in breakdowns.items():
        notes += f"\n\n## Device time of `{name}` by kernel ({args.profile_steps} steps)\n{table}"
    write_results(args.out, "dit_ablation", rows, notes, tiny=args.tiny)


def run_flag_sets(args: argparse.Namespace, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Times each ``VARIANT+SET`` in a child process with the set's XLA flags. Run before this
    process touches the GPU, so that its allocator holds nothing a child needs."""
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), *(["--tiny"] if args.tiny else [])]
    finished = run_child_processes(
        "benchmarks.dit_ablation", names, flags, extra_xla_flags=lambda name: XLA_FLAG_SETS[split_name(name)[1] or ""]
    )
    return {name: result if result is not None else {"status": "failed"} for name, result in finished.items()}


def run_child(args: argparse.Namespace) -> None:
    """``--child NAME``: times one variant (under the XLA flags its parent set) and writes its row as JSON."""
    setup = make_setup(args.tiny, "auto" if args.tiny else "cudnn")
    latents, labels = random_latents(setup)
    data = (jax.device_put(latents), jax.device_put(labels))
    row, _ = time_variant(args.child, split_name(args.child)[0], setup, data, args, {})
    args.result_file.write_text(json.dumps({**row, "xla_flags": os.environ.get("XLA_FLAGS", "")}))


def run(args: argparse.Namespace, names: Sequence[str]) -> None:
    start = time.monotonic()
    children = [name for name in names if "+" in name]
    names = [name for name in names if "+" not in name]
    results: dict[str, dict[str, Any]] = run_flag_sets(args, children) if children else {}
    setup = make_setup(args.tiny, "auto" if args.tiny else "cudnn")
    if children:
        report(args, setup, results, {})  # kept should the in-process variants be cut short
    latents, labels = random_latents(setup)
    data = (jax.device_put(latents), jax.device_put(labels))
    # The fastest non-reference variant so far ("best") and the reference, kept for a profile.
    kept: dict[str, Timed] = {}
    kept_names: dict[str, str] = {}
    programs: dict[str, str] = {}

    def attempt(name: str, variant: Variant) -> None:
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            results[name] = {"status": "skipped (time budget)"}
            return
        print(f"== {name}: {variant}", flush=True)
        try:
            row, timed = time_variant(name, variant, setup, data, args, programs)
        except Exception as error:  # a variant that cannot compile or run is reported, not fatal
            results[name] = {"status": f"failed: {type(error).__name__}"}
            print(f"== {name}: failed: {error!r}"[:2000], flush=True)
            return
        results[name] = row
        print(f"== {name}: {row}", flush=True)
        if timed is None:
            return
        slot = "reference" if name == "reference" else "best"
        if slot not in kept or timed.rate > kept[slot].rate:
            kept[slot], kept_names[slot] = timed, name
        del timed
        gc.collect()
        report(args, setup, results, {})

    for name in names:
        variant = VARIANTS[name]
        same = variant.model == "xax" and variant.config
        if same and dataclasses.replace(setup.model, **dict(variant.config)) == setup.model:
            results[name] = {"status": "same as xax"}
            continue
        attempt(name, variant)
    combined = combined_variant(results)
    if combined is not None:
        attempt("combined", combined)
        results["combined"]["options"] = str(combined.options)
    breakdowns: dict[str, str] = {}
    if args.profile_steps > 0:
        for slot in ("best", "reference"):
            if slot in kept and (args.budget_s is None or time.monotonic() - start < args.budget_s + 30):
                name = kept_names[slot]
                try:
                    breakdowns[name] = profile(kept[slot], data, args)
                except Exception as error:
                    breakdowns[name] = f"failed: {error!r}"[:500]
    report(args, setup, results, breakdowns)


# ---- what the lowered steps hold -----------------------------------------------------------------


def equations(jaxpr: Any) -> Any:
    """Every equation of a jaxpr and of the jaxprs inside it (jit, custom_vjp, remat, scan bodies)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


def abstract_batch(setup: Setup, batch: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The shapes of a step's data arguments (latents, labels, indices) for ``batch`` images, the
    training set being the batch itself."""
    chw = setup.model.in_channels * setup.model.input_size**2
    return (
        jax.ShapeDtypeStruct((batch, chw), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
    )


def hlo_summary(variant: Variant, setup: Setup, batch: int) -> dict[str, Any]:
    """Counts, in the step's jaxpr and its StableHLO lowered for CUDA, of what costs memory traffic:
    dot_generals by operand dtypes, transposes, pads and dynamic-update-slices (the gradients of
    slices of stacked weights), concatenates, copies and large float32 <-> bf16 converts."""
    import collections
    import re

    from jax._src.cudnn import fused_attention_stablehlo

    step, state = build(variant, setup, gpu=True, abstract=True)
    data = abstract_batch(setup, batch)
    # Traced and lowered only, for CUDA, on a machine that may have no GPU: the library and jax.nn
    # check for a GPU backend and cuDNN before choosing cuDNN attention, so both checks are told yes.
    with (
        mock.patch.object(fused_attention_stablehlo, "check_cudnn_version", return_value=91000),
        mock.patch.object(jax, "default_backend", return_value="gpu"),
        gelu_of(variant),
    ):
        traced = step.trace(*state, *data)
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    big = 100_000  # elements: activations at batch 2 are 2 x 256 x 768
    counts: collections.Counter[str] = collections.Counter()
    dots: collections.Counter[str] = collections.Counter()
    for eqn in equations(traced.jaxpr.jaxpr):
        name = eqn.primitive.name
        outs = [v.aval for v in eqn.outvars if hasattr(v.aval, "shape")]
        size = max((int(np.prod(a.shape)) for a in outs), default=0)
        if name == "dot_general":
            lhs, rhs = (v.aval.dtype for v in eqn.invars[:2])
            dots[f"{lhs}x{rhs}->{outs[0].dtype}"] += 1
        elif name in ("transpose", "pad", "dynamic_update_slice", "concatenate", "copy", "copy_p"):
            stacked = len(outs[0].shape) >= 2 and outs[0].shape[0] == setup.model.num_layers
            if name in ("pad", "dynamic_update_slice") and stacked:
                counts[f"{name} to a stacked (num_layers, ...) shape"] += 1
            elif size >= big:
                counts[f"{name} (>= 1e5)"] += 1
        elif name == "convert_element_type" and size >= big:
            counts[f"convert {eqn.invars[0].aval.dtype}->{outs[0].dtype} (>= 1e5)"] += 1
    transposes = collections.Counter()
    for line in text.splitlines():
        match = re.search(r"stablehlo\.transpose .*-> tensor<([0-9x]+)x(\w+)>", line)
        if match:
            shape = tuple(int(n) for n in match.group(1).split("x"))
            if int(np.prod(shape)) >= big:
                transposes[f"{match.group(1)}x{match.group(2)}"] += 1
    customs = collections.Counter(re.findall(r"custom_call @([\w$]+)", text))
    return {
        "dot_general": dict(dots),
        "jaxpr": dict(counts),
        "hlo_transposes": dict(transposes),
        "custom": dict(customs),
    }


def check_hlo(names: Sequence[str], batch: int) -> None:
    """Prints ``hlo_summary`` of each variant at DiT-B/2's shapes (nothing is run)."""
    setup = make_setup(False, "cudnn")
    for name in names:
        try:
            summary = hlo_summary(VARIANTS[name], setup, batch)
        except Exception as error:
            print(f"## {name}: failed: {error!r}"[:1000], flush=True)
            continue
        print(f"## {name}", flush=True)
        for key, value in summary.items():
            print(f"- {key}: {value}", flush=True)


def compiled_temp_bytes(variant: Variant, setup: Setup, batch: int) -> int:
    """The scratch memory (``memory_analysis().temp_size_in_bytes``: activations kept for the backward
    and intermediates) of the variant's step compiled for this machine's backend, run nothing; off a
    GPU, attention is XLA's."""
    gpu = jax.default_backend() == "gpu"
    step, state = build(variant, setup, gpu=gpu, abstract=True)
    data = abstract_batch(setup, batch)
    with gelu_of(variant):
        compiled = step.trace(*state, *data).lower().compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def check_memory(names: Sequence[str], batch: int, tiny: bool) -> None:
    """Prints ``compiled_temp_bytes`` of each variant at DiT-B/2's shapes (the tiny model's with ``tiny``)."""
    setup = make_setup(tiny, "auto" if jax.default_backend() != "gpu" else "cudnn")
    print(f"## scratch memory of the compiled step, batch {batch}, {jax.default_backend()} backend", flush=True)
    for name in names:
        print(f"- {name}: {compiled_temp_bytes(VARIANTS[name], setup, batch) / 1e9:.3f} GB", flush=True)


def known(name: str) -> bool:
    try:
        split_name(name)
    except KeyError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DiT-B/2 training-step variants, side by side, and a kernel breakdown")
    parser.add_argument("--steps", type=int, default=None, help="Last timed step (default 30; 4 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps after compiling (default 5; 1 --tiny)")
    parser.add_argument("--which", default=",".join(VARIANTS), help="Comma-separated variants, in order")
    parser.add_argument("--budget-s", type=float, default=None, help="Start no variant after this many seconds")
    parser.add_argument("--profile-steps", type=int, default=None, help="Steps profiled (default 3; 0: none)")
    parser.add_argument("--top", type=int, default=30, help="Kernels listed per profiler line")
    parser.add_argument("--out", type=Path, default=None, help="Results folder (default benchmarks/results)")
    parser.add_argument("--tiny", action="store_true", help="Tiny model: every variant on CPU; no numbers")
    parser.add_argument("--check-hlo", action="store_true", help="Lower each variant at DiT-B/2's shapes; run nothing")
    parser.add_argument("--hlo-batch", type=int, default=2, help="Batch of --check-hlo and --check-memory")
    parser.add_argument(
        "--check-memory",
        action="store_true",
        help="Compile each variant for this machine (DiT-B/2's shapes; the tiny model's with --tiny) and print its "
        "scratch memory; run nothing",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.command = "python -m benchmarks.dit_ablation " + " ".join(sys.argv[1:] if argv is None else argv)
    names = [n.strip() for n in args.which.split(",") if n.strip()]
    unknown = [name for name in names if not known(name)]
    if unknown:
        raise SystemExit(
            f"error: --which names unknown variants {unknown}; choose from {list(VARIANTS)}, each optionally "
            f"+ an XLA flag set of {list(XLA_FLAG_SETS)} (e.g. xax+cublaslt)"
        )
    if args.check_hlo:
        check_hlo([name for name in names if "+" not in name], args.hlo_batch)
        return
    if args.check_memory:
        check_memory([name for name in names if "+" not in name], args.hlo_batch, args.tiny)
        return
    args.steps = args.steps if args.steps is not None else (4 if args.tiny else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.profile_steps = args.profile_steps if args.profile_steps is not None else (1 if args.tiny else 3)
    if not 0 < args.warmup < args.steps:
        raise SystemExit(f"error: need 0 < --warmup < --steps, got --warmup {args.warmup} --steps {args.steps}")
    if args.child is not None:
        run_child(args)
        return
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="xax_dit_ablation_")) if args.tiny else Path("benchmarks/results")
    run(args, names)


if __name__ == "__main__":
    main()
