"""The VAE: the closed-form Gaussian KL against torch and a Monte Carlo estimate, reparameterized sampling,
shapes, and reconstructions that improve when it trains briefly on real MNIST digits."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from examples.mnist_data import load_mnist
from xax.arch.vae import VAE, VAEConfig, gaussian_kl, reparameterize, vae_loss

NEEDS_TORCH = "needs the torch extra (torch, transformers), which `make install` adds on Python 3.11 only"


def test_kl_matches_torch_and_monte_carlo() -> None:
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(3, 2, 4)), rng.normal(scale=0.5, size=(3, 2, 4))
    got = np.asarray(gaussian_kl(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32)))
    q = torch.distributions.Normal(torch.tensor(mean), torch.tensor(np.exp(0.5 * logvar)))
    p = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    expected = torch.distributions.kl_divergence(q, p).reshape(3, -1).sum(dim=1).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Monte Carlo: E_q[log q(z) - log p(z)] over 200k draws of the first sample's 8 coordinates.
    z = q.sample((200_000,))[:, 0]
    first = torch.distributions.Normal(q.loc[0], q.scale[0])
    log_ratio = (first.log_prob(z) - p.log_prob(z)).sum(dim=(1, 2)).numpy()
    assert abs(log_ratio.mean() - got[0]) < 4 * log_ratio.std() / np.sqrt(len(log_ratio))


def test_reparameterized_samples_have_the_posterior_moments_and_pathwise_gradients() -> None:
    mean, logvar = jnp.array([1.5, -0.5]), jnp.array([0.0, -2.0])
    z = jax.vmap(lambda k: reparameterize(mean, logvar, k))(jax.random.split(jax.random.key(0), 50_000))
    np.testing.assert_allclose(z.mean(axis=0), mean, atol=0.02)
    np.testing.assert_allclose(z.std(axis=0), jnp.exp(0.5 * logvar), rtol=0.02)
    grad = jax.grad(lambda m: reparameterize(m, logvar, jax.random.key(1)).sum())(mean)
    np.testing.assert_array_equal(grad, jnp.ones(2))


def test_loss_formula() -> None:
    x = jnp.ones((2, 1, 2, 2))
    recon = jnp.zeros((2, 1, 2, 2))
    mean, logvar = jnp.ones((2, 3)), jnp.zeros((2, 3))
    loss, rec, kl = vae_loss(recon, x, mean, logvar, beta=0.5)
    assert float(rec) == 4.0  # four unit errors per image
    assert float(kl) == 1.5  # 1/2 * 3 * 1^2
    assert float(loss) == 4.0 + 0.5 * 1.5


def test_shapes_and_config_errors() -> None:
    model = eqx.filter_eval_shape(VAE, VAEConfig(), key=jax.random.key(0))
    mean, logvar = eqx.filter_eval_shape(
        lambda m, x: m.encode(x), model, jax.ShapeDtypeStruct((1, 28, 28), jnp.float32)
    )
    assert mean.shape == logvar.shape == (4, 14, 14)
    out = eqx.filter_eval_shape(lambda m, z: m.decode(z), model, mean)
    assert out.shape == (1, 28, 28)
    with pytest.raises(ValueError, match=r"VAEConfig.norm_groups=3 does not divide the width 32"):
        VAE(VAEConfig(norm_groups=3), key=jax.random.key(0))


@pytest.mark.slow  # compiles the UNet/VAE's many layer shapes: about a minute on 2 cores
def test_reconstructions_improve_on_mnist() -> None:
    # 512 real digits, average-pooled to 14x14 and scaled to [-1, 1] to keep the run short on a CPU.
    images = load_mnist("train").with_format("numpy")[:512]["image"].astype(np.float32) / 255.0
    images = images.reshape(512, 1, 14, 2, 14, 2).mean(axis=(3, 5)) * 2 - 1
    data = jnp.asarray(images)
    model = VAE(VAEConfig(base_channels=8, norm_groups=4), key=jax.random.key(0))
    optimizer = optax.adam(3e-3)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def recon_error(params: VAE) -> jax.Array:
        vae = eqx.combine(params, static)
        means = jax.vmap(lambda x: vae.encode(x)[0])(data)
        return jnp.mean((jax.vmap(vae.decode)(means) - data) ** 2)

    def step(carry: tuple, key: jax.Array) -> tuple[tuple, jax.Array]:
        params, opt_state = carry
        batch_key, noise_key = jax.random.split(key)
        batch = data[jax.random.permutation(batch_key, 512)[:32]]

        def loss_fn(p: VAE) -> jax.Array:
            recon, mean, logvar = jax.vmap(eqx.combine(p, static))(batch, jax.random.split(noise_key, 32))
            return vae_loss(recon, batch, mean, logvar, beta=0.01)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def train(params: Any) -> tuple[Any, jax.Array]:
        (params, _), losses = jax.lax.scan(
            step, (params, optimizer.init(params)), jax.random.split(jax.random.key(1), 80)
        )
        return params, losses

    before = float(jax.jit(recon_error)(params))
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam bias correction mixes int32 and float
        trained, losses = train(params)
    after = float(jax.jit(recon_error)(trained))
    assert float(losses[-10:].mean()) < 0.5 * float(losses[:10].mean())
    assert after < 0.5 * before, (before, after)
