"""Logical axes of parameters: which dimension of a weight is the model width, the heads, the vocabulary.

A rule names the logical axis of each dimension of the parameters whose dotted path matches its
pattern (the first matching rule wins). Linear weights are ``(out, in)``, as in Equinox. A
parameter with one more dimension than its rule is a stack of layers (scanned transformer
layers, DiT blocks) and gets ``layers`` in front. Parameters no rule names are left to the
plan's default (see ``xax.parallel.plan``).

The rules themselves belong to the models: each module of ``xax.arch`` declares ``SHARDING_RULES``
beside its model, and ``xax.arch.SHARDING_RULES`` joins them; that table is the default here. A
model of one's own passes its rules explicitly.

Logical axes: ``embed`` (model width), ``heads`` (query heads x head width), ``kv_heads``
(key/value heads x head width), ``mlp`` (feed-forward width), ``vocab``, ``layers`` (stacked
layers, never sharded), and None (never sharded: norms, biases added to the residual stream).
"""

import functools
import re
from collections.abc import Sequence

from xax.parallel.errors import ShardingError

Logical = tuple[str | None, ...]
# (pattern searched in a dotted parameter path, the logical axis of each dimension), first match wins.
Rules = tuple[tuple[str, Logical], ...]

LAYERS = "layers"
LOGICAL_AXES = ("embed", "heads", "kv_heads", "mlp", "vocab", LAYERS)


def model_rules() -> Rules:
    """The rules the models of ``xax.arch`` declare (``xax.arch.SHARDING_RULES``), in order."""
    # Imported here: the models declare their rules, and the mechanism reads them only when used.
    from xax.arch import SHARDING_RULES

    return SHARDING_RULES


@functools.cache
def compile_rules(rules: Rules) -> tuple[tuple[re.Pattern[str], Logical], ...]:
    """Compiles the patterns of ``rules`` once, checking that every axis is a logical axis.

    Raises:
        ShardingError: Naming a rule whose pattern does not compile or whose axis is unknown.
    """
    compiled = []
    for pattern, axes in rules:
        unknown = [axis for axis in axes if axis is not None and axis not in LOGICAL_AXES]
        if unknown:
            raise ShardingError(
                f"sharding rule {pattern!r} names the axis {unknown[0]!r}; use one of {LOGICAL_AXES} or None"
            )
        try:
            compiled.append((re.compile(pattern), axes))
        except re.error as error:
            raise ShardingError(f"sharding rule {pattern!r} is not a regular expression: {error}") from None
    return tuple(compiled)


def logical_axes(path: str, shape: Sequence[int], rules: Rules | None = None) -> Logical | None:
    """The logical axis of each dimension of the parameter at ``path``, or None when no rule names it.

    Args:
        path: The parameter's dotted path in the model (``layers.self_attn.q_proj.weight``).
        shape: Its shape.
        rules: The rules to apply; None applies those of every model in ``xax.arch``.

    Returns:
        One logical axis (or None) per dimension; None when no rule matches this path and rank.
    """
    for pattern, axes in compile_rules(model_rules() if rules is None else rules):
        if pattern.search(path):
            if len(shape) == len(axes):
                return axes
            if len(shape) == len(axes) + 1:
                return (LAYERS, *axes)
            return None
    return None
