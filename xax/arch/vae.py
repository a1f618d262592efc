"""A small convolutional KL-regularized VAE (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"), laid out
like the Stable Diffusion autoencoder (Rombach et al. 2022) at small scale: residual GroupNorm blocks, strided
downsampling in the encoder, nearest-neighbour upsampling in the decoder, and a diagonal Gaussian posterior.

One image ``(C, H, W)`` maps to latents ``(latent_channels, H / 2^(L-1), W / 2^(L-1))`` for ``L`` levels;
``jax.vmap`` the methods over a batch.
"""

from dataclasses import dataclass
from typing import final

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from xax.arch.config import ModelConfigError, ShardingRules, check_positive
from xax.arch.unet import Downsample, ResBlock, Upsample
from xax.core.config import field, register_config
from xax.nn.distributions import Normal

# Rombach et al. (2022) clamp the log-variance so that exp() neither overflows nor collapses to zero.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@register_config
@dataclass(frozen=True)
class VAEConfig:
    """The shape of a VAE; defaults are sized for 28x28 MNIST digits."""

    in_channels: int = field(1, help="Image channels: 1 for MNIST")
    latent_channels: int = field(4, help="Latent channels, as in the Stable Diffusion autoencoder")
    base_channels: int = field(32, help="Width at full resolution; 32 suffices for 28x28 digits")
    channel_mults: tuple[int, ...] = field((1, 2), help="Width multiple per level; two levels downsample 2x (28->14)")
    num_res_blocks: int = field(1, help="Residual blocks per level; one keeps the model small and fast")
    norm_groups: int = field(8, help="GroupNorm groups; 8 divides every default width (32, 64)")

    def __post_init__(self) -> None:
        check_positive(self, "in_channels", "latent_channels", "base_channels", "norm_groups")
        if self.num_res_blocks < 1:
            raise ModelConfigError(
                f"VAEConfig.num_res_blocks={self.num_res_blocks} must be at least 1 (they change widths)"
            )
        for mult in self.channel_mults:
            if (self.base_channels * mult) % self.norm_groups:
                raise ModelConfigError(
                    f"VAEConfig.norm_groups={self.norm_groups} does not divide the width {self.base_channels * mult} "
                    f"(base_channels={self.base_channels} x channel_mults={self.channel_mults}); pick a divisor"
                )


# Logical axes of the parameters (xax.parallel.rules): the encoder's and decoder's last norms whole;
# the convolutions take the plan's default.
SHARDING_RULES: ShardingRules = ((r"norm\.(weight|bias)$", (None,)),)


def _conv3(cin: int, cout: int, key: PRNGKeyArray) -> eqx.nn.Conv2d:
    return eqx.nn.Conv2d(cin, cout, 3, padding=1, key=key)


def _stage(blocks: tuple[ResBlock, ...], x: Array) -> Array:
    for block in blocks:
        x = block(x, None)
    return x


@final
class VAE(eqx.Module):
    """Encoder to a diagonal Gaussian ``q(z | x)``, reparameterized sampling, and a decoder back to images."""

    enc_in: eqx.nn.Conv2d
    enc_levels: tuple[tuple[ResBlock, ...], ...]
    enc_down: tuple[Downsample, ...]
    enc_mid: ResBlock
    enc_norm: eqx.nn.GroupNorm
    enc_out: eqx.nn.Conv2d
    dec_in: eqx.nn.Conv2d
    dec_mid: ResBlock
    dec_levels: tuple[tuple[ResBlock, ...], ...]
    dec_up: tuple[Upsample, ...]
    dec_norm: eqx.nn.GroupNorm
    dec_out: eqx.nn.Conv2d

    def __init__(self, config: VAEConfig, *, key: PRNGKeyArray) -> None:
        keys = iter(jax.random.split(key, 64))
        widths = [config.base_channels * mult for mult in config.channel_mults]
        groups, blocks = config.norm_groups, config.num_res_blocks

        self.enc_in = _conv3(config.in_channels, widths[0], next(keys))
        levels, width = [], widths[0]
        for out in widths:
            levels.append(
                tuple(ResBlock(width if i == 0 else out, out, None, groups, key=next(keys)) for i in range(blocks))
            )
            width = out
        self.enc_levels = tuple(levels)
        self.enc_down = tuple(Downsample(w, key=next(keys)) for w in widths[:-1])
        self.enc_mid = ResBlock(width, width, None, groups, key=next(keys))
        self.enc_norm = eqx.nn.GroupNorm(groups, width)
        self.enc_out = _conv3(width, 2 * config.latent_channels, next(keys))

        self.dec_in = _conv3(config.latent_channels, width, next(keys))
        self.dec_mid = ResBlock(width, width, None, groups, key=next(keys))
        levels = []
        for out in reversed(widths):
            levels.append(
                tuple(ResBlock(width if i == 0 else out, out, None, groups, key=next(keys)) for i in range(blocks + 1))
            )
            width = out
        self.dec_levels = tuple(levels)
        self.dec_up = tuple(Upsample(w, key=next(keys)) for w in reversed(widths[1:]))
        self.dec_norm = eqx.nn.GroupNorm(groups, width)
        self.dec_out = _conv3(width, config.in_channels, next(keys))

    def encode(self, x: Float[Array, "c h w"]) -> tuple[Float[Array, "l hl wl"], Float[Array, "l hl wl"]]:
        """The posterior ``q(z | x) = N(mean, exp(logvar))``: returns ``(mean, logvar)``."""
        factor = 2 ** len(self.enc_down)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"VAE input of size {x.shape[1:]} must be divisible by {factor}; pad the images")
        h = self.enc_in(x)
        for i, level in enumerate(self.enc_levels):
            h = _stage(level, h)
            if i < len(self.enc_down):
                h = self.enc_down[i](h)
        h = self.enc_out(jax.nn.silu(self.enc_norm(self.enc_mid(h, None))))  # (2L, hl, wl)
        mean, logvar = jnp.split(h, 2, axis=0)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: Float[Array, "l hl wl"]) -> Float[Array, "c h w"]:
        """The decoder's mean image for latents ``z``."""
        h = self.dec_mid(self.dec_in(z), None)
        for i, level in enumerate(self.dec_levels):
            h = _stage(level, h)
            if i < len(self.dec_up):
                h = self.dec_up[i](h)
        return self.dec_out(jax.nn.silu(self.dec_norm(h)))

    def __call__(
        self, x: Float[Array, "c h w"], key: PRNGKeyArray
    ) -> tuple[Float[Array, "c h w"], Float[Array, "l hl wl"], Float[Array, "l hl wl"]]:
        """Encodes, samples ``z`` by reparameterization and decodes: returns ``(reconstruction, mean, logvar)``."""
        mean, logvar = self.encode(x)
        return self.decode(reparameterize(mean, logvar, key)), mean, logvar


def reparameterize(mean: Float[Array, "*shape"], logvar: Float[Array, "*shape"], key: PRNGKeyArray) -> Array:
    """``z = mean + exp(logvar / 2) eps`` with ``eps ~ N(0, I)`` (Kingma & Welling 2014, section 2.4)."""
    return Normal.from_logvar(mean, logvar).sample(key)


def gaussian_kl(mean: Float[Array, " b *shape"], logvar: Float[Array, " b *shape"]) -> Float[Array, " b"]:
    """``KL(N(mean, exp(logvar)) || N(0, I)) = 1/2 sum(mean^2 + exp(logvar) - 1 - logvar)`` per sample
    (Kingma & Welling 2014, appendix B), in float32."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    kl = Normal.from_logvar(mean, logvar).kl(Normal.standard(mean))
    return kl.reshape(kl.shape[0], -1).sum(axis=1)


def vae_loss(
    reconstruction: Float[Array, " b *dims"],
    x: Float[Array, " b *dims"],
    mean: Float[Array, " b *latent"],
    logvar: Float[Array, " b *latent"],
    beta: float = 1.0,
) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""]]:
    """The beta-VAE objective (Higgins et al. 2017): ``E_b[sum (x - x_hat)^2] + beta E_b[KL(q(z|x) || N(0, I))]``.

    The squared error is the negative log-likelihood of a Gaussian decoder of variance 1/2 up to a constant,
    so ``beta = 1`` is the negative ELBO; latent-diffusion autoencoders use a small ``beta`` (about 1e-6 of the
    pixel count) to keep the latents nearly deterministic.

    Returns:
        ``(loss, reconstruction term, KL term)``, each a float32 scalar averaged over the batch.
    """
    error = (reconstruction - x).astype(jnp.float32) ** 2
    recon = error.reshape(error.shape[0], -1).sum(axis=1).mean()
    kl = gaussian_kl(mean, logvar).mean()
    return recon + beta * kl, recon, kl
