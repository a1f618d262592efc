"""Logical axes of parameters: which dimension of a weight is the model width, the heads, the vocabulary.

A rule names the logical axis of each dimension of the parameters whose dotted path matches its
pattern (the first matching rule wins). Linear weights are ``(out, in)``, as in Equinox. A
parameter with one more dimension than its rule is a stack of layers (scanned transformer
layers, DiT blocks) and gets ``layers`` in front. Parameters no rule names are left to the
plan's default (see ``xax.parallel.plan``).

Logical axes: ``embed`` (model width), ``heads`` (query heads x head width), ``kv_heads``
(key/value heads x head width), ``mlp`` (feed-forward width), ``vocab``, ``layers`` (stacked
layers, never sharded), and None (never sharded: norms, biases added to the residual stream).
"""

import re
from collections.abc import Sequence

Logical = tuple[str | None, ...]

LAYERS = "layers"
LOGICAL_AXES = ("embed", "heads", "kv_heads", "mlp", "vocab", LAYERS)

# A trailing ``(\.base)?`` also matches the frozen weight inside a LoRALinear.
_LIN = r"(\.base)?"
RULES: tuple[tuple[str, Logical], ...] = (
    # Token embeddings and output projections: xax.arch.transformer, xax.arch.ssm.
    (r"(^|\.)(embed_tokens|embed)\.weight$", ("vocab", "embed")),
    (rf"(^|\.)lm_head{_LIN}\.weight$", ("vocab", "embed")),
    (r"(^|\.)unembed$", ("vocab", "embed")),
    (r"(^|\.)embed_positions\.weight$", (None, "embed")),
    # Attention (xax.nn.attention): q/k/v column-parallel, o row-parallel.
    (rf"q_proj{_LIN}\.weight$", ("heads", "embed")),
    (rf"[kv]_proj{_LIN}\.weight$", ("kv_heads", "embed")),
    (rf"q_proj{_LIN}\.bias$", ("heads",)),
    (rf"[kv]_proj{_LIN}\.bias$", ("kv_heads",)),
    (rf"o_proj{_LIN}\.weight$", ("embed", "heads")),
    # Feed-forward (xax.nn.mlp, also in DiT blocks and the SSM model): gate/up column-parallel, down row-parallel.
    (rf"(gate|up)_proj{_LIN}\.weight$", ("mlp", "embed")),
    (rf"(gate|up)_proj{_LIN}\.bias$", ("mlp",)),
    (rf"down_proj{_LIN}\.weight$", ("embed", "mlp")),
    (rf"(o|down)_proj{_LIN}\.bias$", (None,)),
    # DiT blocks and UNet attention: fused qkv and output projection (xax.arch.dit, xax.arch.unet).
    (r"(^|\.)qkv\.weight$", ("heads", "embed")),
    (r"(^|\.)qkv\.bias$", ("heads",)),
    (r"(^|\.)proj\.weight$", ("embed", "heads")),
    # Norm scales and shifts: small, and needed whole by every device.
    (r"norm\.(weight|bias)$", (None,)),
)

_COMPILED = tuple((re.compile(pattern), axes) for pattern, axes in RULES)


def logical_axes(path: str, shape: Sequence[int]) -> Logical | None:
    """The logical axis of each dimension of the parameter at ``path``, or None when no rule names it.

    Args:
        path: The parameter's dotted path in the model (``layers.self_attn.q_proj.weight``).
        shape: Its shape.

    Returns:
        One logical axis (or None) per dimension; None when no rule matches this path and rank.
    """
    for pattern, axes in _COMPILED:
        if pattern.search(path):
            if len(shape) == len(axes):
                return axes
            if len(shape) == len(axes) + 1:
                return (LAYERS, *axes)
            return None
    return None
