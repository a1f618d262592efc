"""A tiny class-conditional DiT overfits two MNIST digits: the loss falls and DDIM samples land next to
the digit of the class they were asked for."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples.mnist_data import load_mnist
from xax.arch.diffusion import GaussianSchedule, ddim_sample, diffusion_loss, drop_labels, guided
from xax.arch.dit import DiT, dit_config

NUM_CLASSES = 2  # also the null label
CONFIG = dit_config(
    "DiT-S/2",
    input_size=14,
    in_channels=1,
    d_model=32,
    num_layers=2,
    num_heads=2,
    num_classes=NUM_CLASSES,
    frequency_dim=32,
)


def test_tiny_dit_overfits_two_digits() -> None:
    dataset = load_mnist("train").with_format("numpy")[:2]
    # Two digits average-pooled to 14x14 in [-1, 1]; their labels become classes 0 and 1.
    images = dataset["image"].astype(np.float32).reshape(2, 1, 14, 2, 14, 2).mean(axis=(3, 5)) / 127.5 - 1
    data, classes = jnp.asarray(images), jnp.array([0, 1])
    schedule = GaussianSchedule.from_name("cosine", 1000)
    params, static = eqx.partition(DiT(CONFIG, key=jax.random.key(0)), eqx.is_inexact_array)
    optimizer = optax.adam(3e-3)

    def step(carry: tuple, key: jax.Array) -> tuple[tuple, jax.Array]:
        params, opt_state = carry
        pick_key, drop_key, loss_key = jax.random.split(key, 3)
        pick = jax.random.randint(pick_key, (16,), 0, 2)
        labels = drop_labels(classes[pick], drop_key, 0.1, NUM_CLASSES)

        def loss_fn(p: DiT) -> jax.Array:
            net = eqx.combine(p, static)
            return diffusion_loss(lambda x, t: jax.vmap(net)(x, t, labels), schedule, data[pick], loss_key, "v")

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def train(params: Any) -> tuple[Any, jax.Array]:
        (params, _), losses = jax.lax.scan(
            step, (params, optimizer.init(params)), jax.random.split(jax.random.key(1), 600)
        )
        return params, losses

    with jax.numpy_dtype_promotion("standard"):  # optax's Adam bias correction mixes int32 and float
        trained, losses = train(params)
    assert float(losses[-40:].mean()) < 0.3 * float(losses[:40].mean())

    @jax.jit
    def sample(params: DiT, noise: jax.Array, labels: jax.Array) -> jax.Array:
        net = jax.vmap(eqx.combine(params, static))
        return ddim_sample(
            guided(net, labels, NUM_CLASSES, 2.0),
            schedule,
            noise,
            jax.random.key(0),
            25,
            prediction="v",
            clip_x0=1.0,
        )

    labels = jnp.array([0, 1, 0, 1, 0, 1, 0, 1])
    samples = sample(trained, jax.random.normal(jax.random.key(2), (8, 1, 14, 14)), labels)
    rms = jnp.sqrt(jnp.mean((samples[:, None] - data[None]) ** 2, axis=(2, 3, 4)))  # (8 samples, 2 digits)
    gap = float(jnp.sqrt(jnp.mean((data[0] - data[1]) ** 2)))
    # Each sample is far closer to the digit of its class than the two digits are to each other.
    own = rms[jnp.arange(8), labels]
    assert float(own.max()) < 0.25 * gap
