"""Embeddings: learned tables, sinusoidal positions and rotary positions (RoPE) with its scaling variants.

Rotary embeddings follow the Hugging Face ``transformers`` convention ("rotate half": the first and
second halves of each head are the two coordinates of a rotated pair), so checkpoints trained with it
load without permuting weights. The scaling variants match ``transformers``' ``rope_scaling`` /
``rope_parameters`` semantics, field for field:

=========== =================================================================================
rope_type   effect on the inverse frequencies ``inv_freq[i] = theta ** (-2i / dim)``
=========== =================================================================================
default     none
linear      ``inv_freq / factor`` (position interpolation, Chen et al. 2023)
dynamic     NTK-aware: ``theta`` grows with the sequence length past ``max_position_embeddings``
llama3      low frequencies divided by ``factor``, high kept, a smooth ramp between (Llama 3.1)
yarn        per-frequency blend of interpolation and extrapolation plus an attention factor
            on cos/sin (Peng et al. 2023, https://arxiv.org/abs/2309.00071)
=========== =================================================================================
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.experimental import checkify
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int, PRNGKeyArray

# GPT-2's initializer range; also the default of most Hugging Face configs.
_DEFAULT_INIT_STD = 0.02


class Embedding(eqx.Module):
    """A learned lookup table, used for tokens and for learned absolute positions.

    Attributes:
        weight: The table, shape (num_embeddings, dim).
    """

    weight: Float[Array, "num dim"]

    def __init__(
        self,
        num_embeddings: int,
        dim: int,
        *,
        key: PRNGKeyArray,
        init_std: float = _DEFAULT_INIT_STD,
        dtype: DTypeLike = jnp.float32,
    ) -> None:
        """Initializes the table from N(0, init_std^2).

        Args:
            num_embeddings: The number of rows (vocabulary size or maximum position).
            dim: The embedding width.
            key: The PRNG key for initialization.
            init_std: The standard deviation of the initial weights.
            dtype: The parameter dtype.
        """
        self.weight = init_std * jax.random.normal(key, (num_embeddings, dim), dtype=dtype)

    def __call__(self, ids: Int[Array, "*shape"]) -> Float[Array, "*shape dim"]:
        """Looks up rows of the table; ids may have any shape.

        Ids are not checked, so the lookup costs nothing extra: an id at or past ``num_embeddings``
        reads a row of NaN, and a negative one counts from the end (-1 reads the last row). Call
        ``check_id_range`` first for a checked lookup.
        """
        return jnp.take(self.weight, ids, axis=0)


def check_id_range(
    ids: Int[Array, "*shape"], size: int, *, name: str = "ids", size_name: str = "num_embeddings"
) -> None:
    """Checks with ``jax.experimental.checkify`` that every id is in [0, size).

    A failed check names the first offending id (in row-major order) by index and value, e.g.
    ``tokens[1, 3] = 128 is outside [0, vocab_size=128)``. Called eagerly, it raises at once; under
    ``jax.jit`` (or any other transformation) run the caller through ``checkify.checkify`` and call
    ``err.throw()`` on the error it returns. It costs a comparison and two reductions over ``ids``.

    Args:
        ids: Integer ids of any shape.
        size: The number of valid ids (the table's rows).
        name: How the message names the array of ids.
        size_name: How the message names ``size``: the config key that sets it.
    """
    bad = (ids < 0) | (ids >= size)
    first = jnp.argmax(bad.reshape(-1))  # the first offending id (0 when there is none)
    index = jnp.unravel_index(first, ids.shape)
    # Format fields: {0} is the value, {1}..{ndim} its index.
    where = f"[{', '.join(f'{{{d + 1}}}' for d in range(ids.ndim))}]" if ids.ndim else ""
    message = f"{name}{where} = {{0}} is outside [0, {size_name}={size})"
    checkify.check(~jnp.any(bad), message, ids.reshape(-1)[first], *index)


def sinusoidal_embedding(
    positions: Int[Array, "*shape"] | Float[Array, "*shape"],
    dim: int,
    base: float = 10000.0,
) -> Float[Array, "*shape dim"]:
    """Fixed sinusoidal position embeddings (Vaswani et al. 2017, section 3.5).

    ``PE[p, 2i] = sin(p / base^(2i/dim))`` and ``PE[p, 2i+1] = cos(p / base^(2i/dim))``.

    Args:
        positions: Positions of any shape (integers, or floats such as diffusion times).
        dim: The embedding width; must be even.
        base: The longest wavelength divided by 2π.

    Returns:
        Float32 embeddings of shape ``positions.shape + (dim,)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> sinusoidal_embedding(jnp.arange(3), 4).shape
        (3, 4)
        >>> sinusoidal_embedding(jnp.array([0]), 4).tolist()  # sin 0, cos 0 in every pair
        [[0.0, 1.0, 0.0, 1.0]]
    """
    if dim % 2 != 0:
        raise ValueError(f"sinusoidal_embedding: dim must be even, got {dim}; pass an even width")
    inv_freq = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)  # (dim/2,)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.reshape((1,) * positions.ndim + (-1,))
    pairs = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # (*shape, dim/2, 2)
    return pairs.reshape(*positions.shape, dim)


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are rescaled for longer contexts (``transformers``' ``rope_scaling``).

    Attributes:
        rope_type: One of ``ROPE_TYPES``: "default", "linear", "dynamic", "llama3" or "yarn".
        factor: The context extension factor (all types but "default").
        original_max_position_embeddings: The pretraining context length ("llama3", "yarn"); when
            None, the model's ``max_position_embeddings`` is used.
        low_freq_factor: "llama3": wavelengths longer than ``original / low_freq_factor`` are scaled.
        high_freq_factor: "llama3": wavelengths shorter than ``original / high_freq_factor`` are kept.
        beta_fast: "yarn": rotations above which a frequency is extrapolated (kept).
        beta_slow: "yarn": rotations below which a frequency is interpolated (divided by factor).
        attention_factor: "yarn": the multiplier on cos/sin; None derives it from ``factor``.
        mscale: "yarn": numerator coefficient of the derived attention factor (DeepSeek).
        mscale_all_dim: "yarn": denominator coefficient of the derived attention factor (DeepSeek).
        truncate: "yarn": whether the correction range is rounded outwards to whole dimensions.
    """

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"RopeScaling.rope_type={self.rope_type!r} is unknown; expected one of {sorted(ROPE_TYPES)}"
            )


# The frequency functions take (dim, theta, scaling, max_position_embeddings, seq_len) and return
# (inv_freq of shape (dim/2,), attention factor on cos/sin).
_RopeFn = Callable[[int, float, RopeScaling, int, Array | int | None], tuple[Array, float]]


def _base_inv_freq(dim: int, theta: float | Array) -> Array:
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def _default(dim: int, theta: float, scaling: RopeScaling, max_pos: int, seq_len: Array | int | None) -> tuple:
    return _base_inv_freq(dim, theta), 1.0


def _linear(dim: int, theta: float, scaling: RopeScaling, max_pos: int, seq_len: Array | int | None) -> tuple:
    return _base_inv_freq(dim, theta) / scaling.factor, 1.0


def _dynamic(dim: int, theta: float, scaling: RopeScaling, max_pos: int, seq_len: Array | int | None) -> tuple:
    # theta' = theta * (factor * L / L_max - (factor - 1)) ^ (dim / (dim - 2)), with L >= L_max.
    length = jnp.maximum(jnp.asarray(max_pos if seq_len is None else seq_len, jnp.float32), float(max_pos))
    grown = theta * (scaling.factor * length / max_pos - (scaling.factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(dim, grown), 1.0


def _llama3(dim: int, theta: float, scaling: RopeScaling, max_pos: int, seq_len: Array | int | None) -> tuple:
    inv_freq = _base_inv_freq(dim, theta)
    old_len = scaling.original_max_position_embeddings or max_pos
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, scaling: RopeScaling, max_pos: int, seq_len: Array | int | None) -> tuple:
    factor = scaling.factor
    old_len = scaling.original_max_position_embeddings or max_pos
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, scaling.mscale) / _yarn_mscale(factor, scaling.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength completes `rotations` turns over the original context.
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


ROPE_TYPES: dict[str, _RopeFn] = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "llama3": _llama3,
    "yarn": _yarn,
}


def rope_frequencies(
    dim: int,
    theta: float,
    scaling: RopeScaling | None = None,
    max_position_embeddings: int = 2048,
    seq_len: Int[Array, ""] | int | None = None,
) -> tuple[Float[Array, " half"], float]:
    """Computes RoPE inverse frequencies and the attention factor applied to cos and sin.

    Args:
        dim: The rotated width (the head dimension).
        theta: The RoPE base (``rope_theta``).
        scaling: The scaling variant; None means "default".
        max_position_embeddings: The model's context length (used by "dynamic", and by "llama3"
            and "yarn" when ``original_max_position_embeddings`` is unset).
        seq_len: "dynamic" only: the current sequence length (may be traced).

    Returns:
        ``(inv_freq, attention_factor)``: float32 of shape (dim/2,), and a Python float.

    Examples:
        >>> inv_freq, factor = rope_frequencies(4, theta=10000.0)
        >>> [round(f, 4) for f in inv_freq.tolist()], factor
        ([1.0, 0.01], 1.0)
    """
    scaling = scaling or RopeScaling()
    return ROPE_TYPES[scaling.rope_type](dim, theta, scaling, max_position_embeddings, seq_len)


class RotaryEmbedding(eqx.Module):
    """Rotary position embedding (Su et al. 2021, https://arxiv.org/abs/2104.09864).

    A pair ``(x_i, x_{i + dim/2})`` at position ``p`` is rotated by the angle ``p * inv_freq[i]``.
    It holds no parameters; it is a module so the model carries its settings.

    Attributes:
        dim: The rotated width (the head dimension).
        theta: The RoPE base.
        scaling: The scaling variant.
        max_position_embeddings: The model's context length (see ``rope_frequencies``).
    """

    dim: int = eqx.field(static=True)
    theta: float = eqx.field(static=True)
    scaling: RopeScaling | None = eqx.field(static=True)
    max_position_embeddings: int = eqx.field(static=True)

    def __init__(
        self, dim: int, theta: float, scaling: RopeScaling | None = None, max_position_embeddings: int = 2048
    ) -> None:
        if dim % 2 != 0:
            raise ValueError(f"RotaryEmbedding: dim (the head dimension) must be even, got {dim}")
        self.dim = dim
        self.theta = theta
        self.scaling = scaling
        self.max_position_embeddings = max_position_embeddings

    def __call__(
        self, positions: Int[Array, "*shape"]
    ) -> tuple[Float[Array, "*shape dim"], Float[Array, "*shape dim"]]:
        """Returns float32 ``(cos, sin)`` for the given positions, each of shape ``positions.shape + (dim,)``."""
        # "dynamic" grows theta with the longest position seen in this call, as transformers does.
        seq_len = jnp.max(positions) + 1
        inv_freq, attention_factor = rope_frequencies(
            self.dim, self.theta, self.scaling, self.max_position_embeddings, seq_len
        )
        angles = positions.astype(jnp.float32)[..., None] * inv_freq.reshape((1,) * positions.ndim + (-1,))
        angles = jnp.concatenate([angles, angles], axis=-1)  # (*shape, dim)
        return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rotary(
    x: Float[Array, "batch seq heads dim"],
    cos: Float[Array, "batch seq dim"],
    sin: Float[Array, "batch seq dim"],
) -> Float[Array, "batch seq heads dim"]:
    """Rotates queries or keys: ``x * cos + rotate_half(x) * sin``, in the dtype of ``x``.

    Args:
        x: Queries or keys, shape (B, T, H, D).
        cos: Cosines from ``RotaryEmbedding``, shape (B, T, D).
        sin: Sines from ``RotaryEmbedding``, shape (B, T, D).

    Returns:
        The rotated array, same shape and dtype as ``x``.
    """
    cos = cos[:, :, None, :].astype(x.dtype)  # (B, T, 1, D)
    sin = sin[:, :, None, :].astype(x.dtype)
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos + rotated * sin
