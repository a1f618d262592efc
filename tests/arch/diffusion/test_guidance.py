"""Classifier-free guidance: the mix of conditional and unconditional outputs, label dropout, and the
choice of EMA weights for sampling."""

from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from xax.arch.diffusion.guidance import conditioned, drop_labels, guided
from xax.arch.diffusion.samplers import sampling_model, sampling_params
from xax.arch.dit import DiT, dit_config
from xax.task.mixins.train_step import TrainState

M = TypeVar("M")


def randomized(model: M, seed: int, scale: float = 0.2) -> M:
    """Every float leaf redrawn (with numpy: eager jax.random would compile once per leaf shape), so that
    zero-initialized layers no longer hide the inputs' effect."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(model)
    new = [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) if eqx.is_inexact_array(x) else x for x in leaves]
    return jax.tree.unflatten(treedef, new)


def tiny_dit() -> DiT:
    config = dit_config(
        "DiT-S/2", input_size=4, in_channels=1, d_model=16, num_layers=1, num_heads=2, num_classes=3, frequency_dim=8
    )
    return randomized(DiT(config, key=jax.random.key(0)), 1)


def test_guidance_scale_zero_is_unconditional_and_one_conditional() -> None:
    model = tiny_dit()
    net = jax.vmap(model)
    x = jax.random.normal(jax.random.key(2), (4, 1, 4, 4))
    t = jnp.array([0.1, 0.4, 0.6, 0.9])
    labels = jnp.array([0, 1, 2, 1])
    null = jnp.full((4,), model.null_label)
    cond, uncond = net(x, t, labels), net(x, t, null)
    assert float(jnp.abs(cond - uncond).max()) > 1e-2
    np.testing.assert_allclose(guided(net, labels, model.null_label, 0.0)(x, t), uncond, atol=1e-5)
    np.testing.assert_allclose(guided(net, labels, model.null_label, 1.0)(x, t), cond, atol=1e-5)
    np.testing.assert_allclose(
        guided(net, labels, model.null_label, 4.0)(x, t), uncond + 4.0 * (cond - uncond), atol=1e-4
    )
    np.testing.assert_allclose(conditioned(net, labels)(x, t), cond, atol=1e-6)
    # No label at all is the null label.
    np.testing.assert_allclose(jax.vmap(lambda a, b: model(a, b))(x, t), uncond, atol=1e-6)


def test_drop_labels() -> None:
    labels = jax.random.randint(jax.random.key(0), (20_000,), 0, 10)
    np.testing.assert_array_equal(drop_labels(labels, jax.random.key(1), 0.0, 10), labels)
    np.testing.assert_array_equal(drop_labels(labels, jax.random.key(1), 1.0, 10), jnp.full_like(labels, 10))
    dropped = drop_labels(labels, jax.random.key(1), 0.1, 10)
    is_null = dropped == 10
    assert abs(float(is_null.mean()) - 0.1) < 0.01  # standard error 0.002
    np.testing.assert_array_equal(dropped[~is_null], labels[~is_null])
    assert dropped.dtype == labels.dtype


def test_sampling_uses_the_ema_weights_when_kept() -> None:
    model = eqx.nn.Linear(2, 3, key=jax.random.key(0))
    arrays, static = eqx.partition(model, eqx.is_array)
    params, frozen = eqx.partition(arrays, eqx.is_inexact_array)
    ema = jax.tree.map(lambda a: a + 1.0, params)
    opt_state = optax.sgd(0.1).init(params)
    # Every other field of the framework's train state is irrelevant here.
    fields: dict[str, Any] = dict.fromkeys(TrainState._fields) | {
        "params": params,
        "frozen": frozen,
        "opt_state": opt_state,
    }
    with_ema = TrainState(**fields | {"ema": ema, "key": jax.random.key(0)})
    without = with_ema._replace(ema=None)
    assert sampling_params(with_ema) is ema
    assert sampling_params(without) is params
    x = jnp.ones(2)
    np.testing.assert_allclose(sampling_model(with_ema, static)(x), model(x) + 1.0 + 2.0, rtol=1e-6)
    np.testing.assert_allclose(sampling_model(without, static)(x), model(x), rtol=1e-6)
