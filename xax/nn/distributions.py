"""Probability distributions as pytrees: diagonal Gaussian, categorical and Bernoulli.

Each is an ``eqx.Module`` of arrays, so it can be built inside a jitted function, vmapped, returned
from a model and differentiated through. Every method is elementwise over the batch shape, as in
``torch.distributions``: sum ``log_prob``, ``entropy`` and ``kl`` over event axes yourself (a VAE's
latent KL sums over the latent's axes). ``sample`` of ``Normal`` is reparameterized, so gradients
flow into ``mean`` and ``log_std`` (Kingma & Welling 2014, section 2.4).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _xlogy_ratio(p: Array, log_p: Array, log_q: Array) -> Array:
    """``p (log p - log q)`` with ``0 log 0 = 0`` (classes a distribution rules out contribute nothing).

    The logs are replaced where ``p = 0`` before the product, so that no ``0 * inf`` reaches the
    gradient of the branch ``where`` discards.
    """
    allowed = p > 0
    log_p, log_q = jnp.where(allowed, log_p, 0.0), jnp.where(allowed, log_q, 0.0)
    return jnp.where(allowed, p * (log_p - log_q), 0.0)


class Normal(eqx.Module):
    """A Gaussian per element: ``N(mean, exp(log_std)^2)``; a diagonal Gaussian over the batch shape.

    Examples:
        >>> import jax.numpy as jnp
        >>> posterior = Normal(jnp.array([1.0]), jnp.array([0.0]))
        >>> [round(v, 4) for v in posterior.kl(Normal.standard(posterior.mean)).tolist()]  # mean^2 / 2
        [0.5]

    Attributes:
        mean: The means, any shape.
        log_std: The log standard deviations, the same shape (log-parameterized so any value is valid).
    """

    mean: Float[Array, "*shape"]
    log_std: Float[Array, "..."]  # the shape of mean, checked in __check_init__ with a message

    def __check_init__(self) -> None:
        if self.mean.shape != self.log_std.shape:
            raise ValueError(
                f"Normal mean and log_std must have one shape; got {self.mean.shape} and {self.log_std.shape} "
                "(broadcast them first)"
            )

    @classmethod
    def from_logvar(cls, mean: Float[Array, "*shape"], logvar: Float[Array, "*shape"]) -> "Normal":
        """From the log-variance, as VAE encoders output it."""
        return cls(mean, 0.5 * logvar)

    @classmethod
    def standard(cls, like: Float[Array, "*shape"]) -> "Normal":
        """``N(0, 1)`` in the shape and dtype of ``like`` (a VAE's prior)."""
        return cls(jnp.zeros_like(like), jnp.zeros_like(like))

    @property
    def std(self) -> Float[Array, "*shape"]:
        return jnp.exp(self.log_std)

    def sample(self, key: PRNGKeyArray) -> Float[Array, "*shape"]:
        """``mean + std * eps`` with ``eps ~ N(0, 1)``: differentiable in ``mean`` and ``log_std``."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> Float[Array, "*shape"]:
        return self.mean

    def log_prob(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        """``-(x - mean)^2 / (2 std^2) - log std - log(2 pi) / 2``."""
        z = (x - self.mean) * jnp.exp(-self.log_std)
        return -0.5 * z**2 - self.log_std - _HALF_LOG_2PI

    def entropy(self) -> Float[Array, "*shape"]:
        """``log std + (1 + log(2 pi)) / 2``."""
        return self.log_std + 0.5 + _HALF_LOG_2PI

    def kl(self, other: "Normal") -> Float[Array, "*shape"]:
        """``KL(self || other) = log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2``."""
        ratio = jnp.exp(2.0 * (self.log_std - other.log_std))  # s1^2 / s2^2
        gap = (self.mean - other.mean) * jnp.exp(-other.log_std)
        return other.log_std - self.log_std + 0.5 * (ratio + gap**2) - 0.5


class Categorical(eqx.Module):
    """A categorical distribution over the last axis of ``logits``.

    Attributes:
        logits: Unnormalized log-probabilities (*batch, K); ``-inf`` rules a class out.
    """

    logits: Float[Array, "*batch classes"]

    @property
    def log_probs(self) -> Float[Array, "*batch classes"]:
        return jax.nn.log_softmax(self.logits, axis=-1)

    @property
    def probs(self) -> Float[Array, "*batch classes"]:
        return jax.nn.softmax(self.logits, axis=-1)

    def sample(self, key: PRNGKeyArray) -> Int[Array, "*batch"]:
        return jax.random.categorical(key, self.logits, axis=-1).astype(jnp.int32)

    def mode(self) -> Int[Array, "*batch"]:
        return jnp.argmax(self.logits, axis=-1).astype(jnp.int32)

    def log_prob(self, value: Int[Array, "*batch"]) -> Float[Array, "*batch"]:
        return jnp.take_along_axis(self.log_probs, value[..., None].astype(jnp.int32), axis=-1)[..., 0]

    def entropy(self) -> Float[Array, "*batch"]:
        log_p = self.log_probs
        # exp(-inf) = 0 times a finite stand-in: ruled-out classes add nothing, to the value or the gradient.
        return -jnp.sum(jnp.exp(log_p) * jnp.where(log_p > -jnp.inf, log_p, 0.0), axis=-1)

    def kl(self, other: "Categorical") -> Float[Array, "*batch"]:
        """``sum_k p_k (log p_k - log q_k)``: infinite where ``other`` rules out a class ``self`` allows."""
        return jnp.sum(_xlogy_ratio(self.probs, self.log_probs, other.log_probs), axis=-1)


class Bernoulli(eqx.Module):
    """A Bernoulli distribution per element, ``P(1) = sigmoid(logits)``.

    Attributes:
        logits: Log-odds, any shape.
    """

    logits: Float[Array, "*shape"]

    @property
    def probs(self) -> Float[Array, "*shape"]:
        return jax.nn.sigmoid(self.logits)

    def sample(self, key: PRNGKeyArray) -> Bool[Array, "*shape"]:
        return jax.random.bernoulli(key, self.probs)

    def mode(self) -> Bool[Array, "*shape"]:
        return self.logits > 0

    def log_prob(self, value: Array) -> Float[Array, "*shape"]:
        """``log sigmoid(l)`` at 1 and ``log sigmoid(-l)`` at 0, without overflow for large ``|l|``."""
        value = value.astype(self.logits.dtype)
        return -(value * jax.nn.softplus(-self.logits) + (1 - value) * jax.nn.softplus(self.logits))

    def entropy(self) -> Float[Array, "*shape"]:
        p = self.probs
        return p * jax.nn.softplus(-self.logits) + (1 - p) * jax.nn.softplus(self.logits)

    def kl(self, other: "Bernoulli") -> Float[Array, "*shape"]:
        p, q_log1, q_log0 = self.probs, -jax.nn.softplus(-other.logits), -jax.nn.softplus(other.logits)
        p_log1, p_log0 = -jax.nn.softplus(-self.logits), -jax.nn.softplus(self.logits)
        return _xlogy_ratio(p, p_log1, q_log1) + _xlogy_ratio(1 - p, p_log0, q_log0)
