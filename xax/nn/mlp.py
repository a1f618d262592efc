"""Position-wise feed-forward blocks: the two-layer MLP (GPT-2, DiT, the SSM language model) and the
gated SwiGLU (Llama, Qwen).

Attribute names follow Llama's (``gate_proj``, ``up_proj``, ``down_proj``) so that checkpoint name
tables stay short. Both apply over any number of leading axes, in the dtype of their weights.
"""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from xax.nn.lora import AnyLinear, apply_linear, make_linear


def _gelu_exact(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@jax.custom_jvp
def gelu_tanh(x: Array) -> Array:
    """``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`` (``jax.nn.gelu(x, approximate=True)``),
    whose backward pass keeps only ``x``.

    Differentiated by JAX, the forward pass also writes a residual of the tanh for the backward: one
    more array of the input's size per call (an MLP's hidden activations). Here the derivative is its
    own rule, rematerialized: the backward recomputes it from ``x`` (which the layer before keeps
    anyway) in float32, the forward writes the GELU alone, and both move fewer bytes (DiT-B/2's MLPs
    write and read 0.8 GB less per block). Forward-mode differentiation (``jax.jvp``) works as usual.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.linspace(-3.0, 3.0, 7)
        >>> bool(jnp.allclose(jax.grad(lambda v: gelu_tanh(v).sum())(x),
        ...                   jax.grad(lambda v: jax.nn.gelu(v, approximate=True).sum())(x), atol=1e-6))
        True
    """
    return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_slope(x: Array) -> Array:
    """The derivative of ``gelu_tanh`` at ``x``, in float32.

    With u = c (x + 0.044715 x^3): 0.5 (1 + tanh u) = s(2u) and 0.5 (1 - tanh^2 u) = 2 s(2u) s(-2u), s
    the sigmoid, which keep their precision where tanh u is near -1 (where 1 + tanh u would cancel).
    """
    x32 = x.astype(jnp.float32)
    twice = 2.0 * _SQRT_2_OVER_PI * (x32 + 0.044715 * x32 * x32 * x32)
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x32 * x32)
    return jax.nn.sigmoid(twice) * (1.0 + 2.0 * x32 * jax.nn.sigmoid(-twice) * du_dx)


@jax.checkpoint  # the slope is recomputed where the tangent is used: only x is kept for the backward
def _gelu_tanh_tangent(x: Array, tangent: Array) -> Array:
    return (tangent.astype(jnp.float32) * _gelu_tanh_slope(x)).astype(tangent.dtype)


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (tangent,) = primals, tangents
    return gelu_tanh(x), _gelu_tanh_tangent(x, tangent)


# Activations by name. "gelu_tanh" is GPT-2's "gelu_new"; "silu" (swish) is Llama's.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_exact,
    "gelu_tanh": gelu_tanh,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """Looks up an activation by name in ``ACTIVATIONS``.

    Examples:
        >>> import jax.numpy as jnp
        >>> get_activation("relu")(jnp.array([-1.0, 2.0])).tolist()
        [0.0, 2.0]
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is unknown; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(eqx.Module):
    """``down_proj(act(up_proj(x)))``, the transformer feed-forward block of Vaswani et al. and GPT-2.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> mlp = MLP(4, 16, key=jax.random.key(0))
        >>> mlp(jnp.ones((2, 3, 4))).shape
        (2, 3, 4)

    Attributes:
        up_proj: d_model -> hidden.
        down_proj: hidden -> d_model.
        activation: A key of ``ACTIVATIONS``.
    """

    up_proj: AnyLinear
    down_proj: AnyLinear
    activation: str = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        key: PRNGKeyArray,
        activation: str = "gelu",
        use_bias: bool = True,
        init_std: float | None = 0.02,
        out_init_std: float | None = None,
    ) -> None:
        """Builds the block.

        Args:
            dim: The input and output width.
            hidden_dim: The hidden width.
            key: The PRNG key.
            activation: A key of ``ACTIVATIONS``.
            use_bias: Whether the projections have biases.
            init_std: The standard deviation of the input projection's weights (zero biases, as
                GPT-2); None keeps Equinox's ``Linear`` initialization, U(-1/sqrt(fan_in),
                1/sqrt(fan_in)) for weights and biases (as DiT and ViT).
            out_init_std: The same for ``down_proj``; defaults to ``init_std``.
        """
        get_activation(activation)
        k1, k2 = jax.random.split(key)
        if init_std is None:
            self.up_proj = eqx.nn.Linear(dim, hidden_dim, use_bias=use_bias, key=k1)
            self.down_proj = eqx.nn.Linear(hidden_dim, dim, use_bias=use_bias, key=k2)
        else:
            self.up_proj = make_linear(dim, hidden_dim, use_bias, init_std, k1)
            self.down_proj = make_linear(hidden_dim, dim, use_bias, out_init_std or init_std, k2)
        self.activation = activation

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        hidden = get_activation(self.activation)(apply_linear(self.up_proj, x))  # (*batch, hidden)
        return apply_linear(self.down_proj, hidden)


class SwiGLU(eqx.Module):
    """The gated feed-forward block ``down_proj(act(gate_proj(x)) * up_proj(x))`` (Shazeer 2020).

    With ``act = silu`` this is SwiGLU (https://arxiv.org/abs/2002.05202), used by Llama and Qwen.

    Attributes:
        gate_proj: d_model -> hidden, passed through the activation.
        up_proj: d_model -> hidden, the linear branch.
        down_proj: hidden -> d_model.
        activation: A key of ``ACTIVATIONS``.
    """

    gate_proj: AnyLinear
    up_proj: AnyLinear
    down_proj: AnyLinear
    activation: str = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        key: PRNGKeyArray,
        activation: str = "silu",
        use_bias: bool = False,
        init_std: float = 0.02,
        out_init_std: float | None = None,
    ) -> None:
        """Builds the block; arguments as for ``MLP`` (Llama uses no biases, hence the default)."""
        get_activation(activation)
        k1, k2, k3 = jax.random.split(key, 3)
        self.gate_proj = make_linear(dim, hidden_dim, use_bias, init_std, k1)
        self.up_proj = make_linear(dim, hidden_dim, use_bias, init_std, k2)
        self.down_proj = make_linear(hidden_dim, dim, use_bias, out_init_std or init_std, k3)
        self.activation = activation

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        gate = get_activation(self.activation)(apply_linear(self.gate_proj, x))  # (*batch, hidden)
        return apply_linear(self.down_proj, gate * apply_linear(self.up_proj, x))
