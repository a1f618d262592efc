"""Linear layers and their low-rank adapters (LoRA).

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes a weight ``W`` and learns a
low-rank update: ``y = W x + b + (alpha / rank) * B (A x)`` with ``A`` of shape (rank, in) and
``B`` of shape (out, rank), ``B`` initialized to zero so training starts from the base model.

Typical use::

    model = apply_lora(model, r"self_attn\\.(q|v)_proj", rank=8, alpha=16.0, key=key)
    adapters, frozen = partition_lora(model)          # optimizer state only for `adapters`
    opt_state = optimizer.init(adapters)
    ...
    model = merge_lora(eqx.combine(adapters, frozen))  # plain eqx.nn.Linear again

Linears inside layers stacked for ``jax.lax.scan`` (weights of shape (L, out, in)) get stacked
adapters (shapes (L, rank, in) and (L, out, rank)).
"""

import math
import re
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from xax.utils.pytree import path_name


class LoRALinear(eqx.Module):
    """An ``eqx.nn.Linear`` plus a trainable low-rank update; called like the Linear it wraps.

    Attributes:
        base: The wrapped (frozen) linear layer.
        lora_a: The down projection ``A``, shape (*stack, rank, in_features).
        lora_b: The up projection ``B``, shape (*stack, out_features, rank), zeros at init.
        rank: The rank of the update.
        alpha: The update is scaled by ``alpha / rank``.
    """

    base: eqx.nn.Linear
    lora_a: Float[Array, "*stack rank fan_in"]
    lora_b: Float[Array, "*stack fan_out rank"]
    rank: int = eqx.field(static=True)
    alpha: float = eqx.field(static=True)

    def __init__(self, base: eqx.nn.Linear, *, rank: int, alpha: float, key: PRNGKeyArray) -> None:
        """Wraps ``base``; ``A`` ~ U(-1/sqrt(in), 1/sqrt(in)) as in PEFT, ``B`` = 0.

        Args:
            base: The linear layer to adapt.
            rank: The rank of the update; must be positive.
            alpha: The scale numerator.
            key: The PRNG key for ``A``.
        """
        if rank < 1:
            raise ValueError(f"LoRALinear: rank must be a positive integer, got {rank}")
        *stack, fan_out, fan_in = base.weight.shape
        bound = 1.0 / math.sqrt(fan_in)
        dtype = base.weight.dtype
        self.base = base
        self.lora_a = jax.random.uniform(key, (*stack, rank, fan_in), dtype=dtype, minval=-bound, maxval=bound)
        self.lora_b = jnp.zeros((*stack, fan_out, rank), dtype=dtype)
        self.rank = rank
        self.alpha = alpha

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight(self) -> Float[Array, "*stack fan_out fan_in"]:
        """The effective weight ``W + (alpha / rank) B A`` (what ``merge_lora`` stores)."""
        return self.base.weight + (self.lora_b @ self.lora_a) * self.scale

    def __call__(self, x: Float[Array, " fan_in"], *, key: PRNGKeyArray | None = None) -> Float[Array, " fan_out"]:
        """Applies the layer to one vector, as ``eqx.nn.Linear`` does (vmap for batches)."""
        update = self.lora_b @ (self.lora_a @ x)
        return self.base(x) + jnp.asarray(self.scale, dtype=update.dtype) * update


# A linear layer the models accept wherever they hold one.
AnyLinear = eqx.nn.Linear | LoRALinear


def apply_linear(layer: AnyLinear, x: Float[Array, "*batch fan_in"]) -> Float[Array, "*batch fan_out"]:
    """Applies a (LoRA) linear layer over any number of leading axes."""
    flat = x.reshape(-1, x.shape[-1])  # (N, in)
    out = jax.vmap(layer)(flat)  # (N, out)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def make_linear(fan_in: int, fan_out: int, use_bias: bool, init_std: float, key: PRNGKeyArray) -> eqx.nn.Linear:
    """Builds an ``eqx.nn.Linear`` with weights from N(0, init_std^2) and zero bias (GPT-2, Llama init)."""
    layer = eqx.nn.Linear(fan_in, fan_out, use_bias=use_bias, key=key)
    weight = init_std * jax.random.normal(key, (fan_out, fan_in), dtype=jnp.float32)
    layer = eqx.tree_at(lambda lin: lin.weight, layer, weight)
    if use_bias:
        layer = eqx.tree_at(lambda lin: lin.bias, layer, jnp.zeros((fan_out,), dtype=jnp.float32))
    return layer


def _is_linear(node: Any) -> bool:
    return isinstance(node, eqx.nn.Linear | LoRALinear)


def linear_paths(model: Any) -> list[str]:
    """Lists the dotted paths of every linear layer in ``model`` (for choosing a LoRA pattern).

    Examples:
        >>> import jax
        >>> from xax.nn.mlp import MLP
        >>> linear_paths(MLP(4, 8, key=jax.random.key(0)))
        ['up_proj', 'down_proj']
    """
    leaves = jax.tree_util.tree_flatten_with_path(model, is_leaf=_is_linear)[0]
    return [path_name(path) for path, leaf in leaves if _is_linear(leaf)]


def apply_lora(model: Any, pattern: str, *, rank: int, alpha: float, key: PRNGKeyArray) -> Any:
    """Wraps every ``eqx.nn.Linear`` whose dotted path matches ``pattern`` in a ``LoRALinear``.

    Args:
        model: Any pytree of modules.
        pattern: A regular expression searched (``re.search``) in paths such as
            ``layers.self_attn.q_proj`` (see ``linear_paths``).
        rank: The adapter rank.
        alpha: The adapter scale numerator.
        key: The PRNG key; each adapter gets its own fold.

    Returns:
        The model with matching linears wrapped.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from xax.nn.mlp import MLP
        >>> mlp = MLP(4, 8, key=jax.random.key(0))
        >>> adapted = apply_lora(mlp, r"up_proj", rank=2, alpha=4.0, key=jax.random.key(1))
        >>> type(adapted.up_proj).__name__, type(adapted.down_proj).__name__
        ('LoRALinear', 'Linear')
        >>> x = jnp.ones((3, 4))
        >>> bool(jnp.allclose(adapted(x), mlp(x)))  # B starts at zero: the same function
        True
    """
    regex = re.compile(pattern)
    matches = [name for name in linear_paths(model) if regex.search(name)]
    if not matches:
        raise ValueError(
            f"apply_lora: pattern {pattern!r} matches no linear layer; paths are {linear_paths(model)[:12]}"
        )
    keys = dict(zip(matches, jax.random.split(key, len(matches))))

    def wrap(path: tuple, node: Any) -> Any:
        name = path_name(path)
        if isinstance(node, eqx.nn.Linear) and name in keys:
            return LoRALinear(node, rank=rank, alpha=alpha, key=keys[name])
        return node

    return jax.tree_util.tree_map_with_path(wrap, model, is_leaf=_is_linear)


def lora_filter(model: Any) -> Any:
    """Returns a pytree of bools over ``model``: True exactly at the adapter weights ``A`` and ``B``."""

    def mark(node: Any) -> Any:
        if isinstance(node, LoRALinear):
            spec = jax.tree.map(lambda _: False, node)
            return eqx.tree_at(lambda n: (n.lora_a, n.lora_b), spec, (True, True))
        return False

    return jax.tree.map(mark, model, is_leaf=lambda n: isinstance(n, LoRALinear))


def partition_lora(model: Any) -> tuple[Any, Any]:
    """Splits ``model`` into ``(adapters, frozen)`` with ``eqx.partition``; rejoin with ``eqx.combine``."""
    return eqx.partition(model, lora_filter(model))


def merge_lora(model: Any) -> Any:
    """Folds every adapter into its base weight: ``W' = W + (alpha / rank) B A``; returns plain linears."""

    def merge(node: Any) -> Any:
        if isinstance(node, LoRALinear):
            delta = (node.lora_b @ node.lora_a) * node.scale  # (*stack, out, in)
            return eqx.tree_at(lambda n: n.weight, node.base, node.base.weight + delta.astype(node.base.weight.dtype))
        return node

    return jax.tree.map(merge, model, is_leaf=lambda n: isinstance(n, LoRALinear))
