"""The hand-written DiT of the benchmarks computes the same function as the library's DiT, and trains."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import dit_reference
from benchmarks.dit_throughput import make_setup, reference_shape
from xax.arch.dit import DiT


def _dense(layer: eqx.nn.Linear) -> dict[str, Any]:
    return {"w": layer.weight.T, "b": layer.bias}


def _reference_params(dit: DiT) -> dict[str, Any]:
    """The library DiT's weights in the reference's layout."""
    cfg = dit.config
    conv = dit.patch_embed
    assert conv.bias is not None and dit.class_embed is not None
    patch = cfg.patch_size
    blocks = []
    for index in range(cfg.num_layers):
        block = dit.block(index)
        is_linear = lambda x: isinstance(x, eqx.nn.Linear)  # noqa: E731
        up, down = [layer for layer in jax.tree.leaves(block.mlp, is_leaf=is_linear) if is_linear(layer)]
        names = ("modulation", "qkv", "proj")
        blocks.append({**{n: _dense(getattr(block, n)) for n in names}, "fc1": _dense(up), "fc2": _dense(down)})
    return {
        # (D, C, p, p) -> rows in (p, p, C) order, the reference's patch layout.
        "patch": {
            "w": conv.weight.transpose(2, 3, 1, 0).reshape(patch * patch * cfg.in_channels, -1),
            "b": conv.bias[:, 0, 0],
        },
        "time1": _dense(dit.time_embed.linear1),
        "time2": _dense(dit.time_embed.linear2),
        "label": dit.class_embed.weight,
        "blocks": blocks,
        "final_modulation": _dense(dit.final.modulation),
        "final": _dense(dit.final.linear),
    }


def test_reference_computes_the_library_dit() -> None:
    setup = make_setup(True, "auto")
    dit = DiT(setup.model, key=jax.random.key(0))
    params, static = eqx.partition(dit, eqx.is_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    # Off adaLN-Zero's initialization, where every block is the identity and the output zero.
    moved = [leaf + 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys, strict=True)]
    dit = eqx.combine(jax.tree.unflatten(treedef, moved), static)
    shape = reference_shape(setup.model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, shape.in_channels, shape.input_size, shape.input_size), np.float32))
    t = jnp.asarray([0.1, 0.5, 0.9], jnp.float32)
    y = jnp.asarray([1, 4, shape.num_classes], jnp.int32)
    expected = jax.vmap(dit)(x, t, y)
    got = dit_reference.forward(_reference_params(dit), x, t, y, shape, "xla")
    assert float(jnp.abs(expected).max()) > 0.1
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-4)
    # Same parameters, hence the same FLOPs per image in the throughput comparison.
    assert dit_reference.num_params(dit_reference.init_params(shape, jax.random.key(0))) == sum(
        leaf.size for leaf in leaves
    )


def test_reference_trains_on_cpu() -> None:
    shape = reference_shape(make_setup(True, "auto").model)
    params = dit_reference.init_params(shape, jax.random.key(0))
    optimizer = optax.adamw(3e-3)
    opt_state = optimizer.init(params)
    step = dit_reference.make_train_step(shape, optimizer, "xla")
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((16, shape.in_channels * shape.input_size**2), np.float32))
    labels = jnp.asarray(rng.integers(0, shape.num_classes, 16), jnp.int32)
    indices = jnp.arange(16, dtype=jnp.int32)
    key, losses = jax.random.key(1), []
    # jax.nn's XLA attention and optax rely on standard dtype promotion (see the module docstring).
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(60):
            params, opt_state, key, loss = step(params, opt_state, key, latents, labels, indices)
            losses.append(float(loss))
    assert all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
