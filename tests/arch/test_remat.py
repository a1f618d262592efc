"""Rematerialization in the transformer, DiT and UNet: the same gradients, and, for scanned blocks, less
temporary memory in the compiled training step (XLA's memory analysis).

For blocks applied in a Python loop (the UNet's, or a transformer without ``scan_layers``) XLA's CPU
scheduler runs the recomputation as soon as its inputs exist, so the CPU program keeps as much as
without remat; the saving there is a GPU measurement (``benchmarks/remat_memory.py``)."""

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xax.arch.dit import DiT, DiTConfig
from xax.arch.transformer import Transformer, TransformerConfig
from xax.arch.unet import UNet, UNetConfig

BATCH = 4


def transformer(remat: str) -> tuple[Any, Callable[[Any], jax.Array]]:
    config = replace(TransformerConfig.gpt2_tiny(), num_layers=3, scan_layers=True, remat=remat)
    model = eqx.filter_eval_shape(Transformer, config, key=jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (BATCH, config.max_seq_len), 0, config.vocab_size)
    return model, lambda m: jnp.mean(m(tokens)[0] ** 2)


def dit(remat: str) -> tuple[Any, Callable[[Any], jax.Array]]:
    config = DiTConfig(input_size=8, patch_size=2, in_channels=2, d_model=32, num_layers=3, num_heads=2)
    config = replace(config, num_classes=3, frequency_dim=16, remat=remat, scan_layers=True)
    model = eqx.filter_eval_shape(DiT, config, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (BATCH, 2, 8, 8))
    t, y = jnp.linspace(0.1, 0.9, BATCH), jnp.arange(BATCH, dtype=jnp.int32) % 3
    return model, lambda m: jnp.mean(jax.vmap(m)(x, t, y) ** 2)


def unet(remat: str) -> tuple[Any, Callable[[Any], jax.Array]]:
    config = UNetConfig(
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        num_heads=2,
        norm_groups=4,
        num_classes=3,
        remat=remat,
    )
    model = eqx.filter_eval_shape(UNet, config, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (BATCH, 1, 8, 8))
    t, y = jnp.linspace(0.1, 0.9, BATCH), jnp.arange(BATCH, dtype=jnp.int32) % 3
    return model, lambda m: jnp.mean(jax.vmap(m)(x, t, y) ** 2)


def randomized(shapes: Any) -> Any:
    """Random weights for a model built with ``eqx.filter_eval_shape`` (initializing op by op is what
    would take the time here); zero-initialized output layers then pass gradients everywhere."""
    rng = np.random.default_rng(0)
    leaves, treedef = jax.tree.flatten(shapes)
    new = [
        jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x
        for x in leaves
    ]
    return jax.tree.unflatten(treedef, new)


def grads_and_temp_bytes(build: Callable[[str], tuple[Any, Callable[[Any], jax.Array]]], remat: str) -> tuple[Any, int]:
    model, loss = build(remat)
    params, static = eqx.partition(randomized(model), eqx.is_inexact_array)
    grad_fn = jax.jit(jax.grad(lambda p: loss(eqx.combine(p, static))))
    compiled = grad_fn.lower(params).compile()
    memory = compiled.memory_analysis()
    assert memory is not None
    return grad_fn(params), int(memory.temp_size_in_bytes)


@pytest.mark.parametrize(
    ("build", "scanned"),
    [
        (transformer, True),
        (dit, True),
        # The UNet's compiles (remat none and full, forward and backward) take most of a minute on 2 cores.
        pytest.param(unet, False, marks=pytest.mark.slow),
    ],
    ids=["transformer", "dit", "unet"],
)
def test_remat_keeps_gradients_and_lowers_temporary_memory(build: Callable[[str], Any], scanned: bool) -> None:
    grads_none, temp_none = grads_and_temp_bytes(build, "none")
    grads_full, temp_full = grads_and_temp_bytes(build, "full")
    for a, b in zip(jax.tree.leaves(grads_none), jax.tree.leaves(grads_full), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    if scanned:
        assert temp_full < temp_none


@pytest.mark.parametrize("config_class", [DiTConfig, UNetConfig], ids=["dit", "unet"])
def test_unknown_remat_policy_names_the_choices(config_class: Any) -> None:
    with pytest.raises(ValueError, match=r"remat='some' is unknown; expected one of \['dots"):
        config_class(remat="some")
