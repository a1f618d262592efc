"""The whole mmDiT: it starts at zero, reads the context through joint attention, and refuses bad shapes."""

import re
from dataclasses import replace

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.arch.contract_cases import mmdit_config, redrawn
from xax.arch import MMDiT, MMDiTConfig, ModelConfigError


def _inputs() -> tuple[jax.Array, jax.Array, jax.Array]:
    config = mmdit_config()
    x = jax.random.normal(jax.random.key(1), (config.in_channels, config.input_size, config.input_size))
    context = jax.random.normal(jax.random.key(2), (4, config.context_dim))
    return x, jnp.asarray(0.3), context


def test_the_output_starts_at_zero_and_depends_on_the_context_and_its_mask() -> None:
    x, t, context = _inputs()
    forward = eqx.filter_jit(lambda m, c, mask: m(x, t, c, mask))
    fresh = forward(MMDiT(mmdit_config(), key=jax.random.key(0)), context, jnp.ones(4, bool))
    assert fresh.shape == x.shape
    np.testing.assert_array_equal(fresh, jnp.zeros_like(x))  # adaLN-Zero: the final layer starts at zero
    model = redrawn(MMDiT(mmdit_config(), key=jax.random.key(0)), jax.random.key(0))
    everything = forward(model, context, jnp.ones(4, bool))
    other = forward(model, context.at[1].add(1.0), jnp.ones(4, bool))
    assert float(jnp.abs(other - everything).max()) > 1e-3
    # A masked token is read neither by the attention nor by the pooled vector.
    masked = jnp.array([True, False, True, True])
    np.testing.assert_allclose(
        forward(model, context.at[1].add(1.0), masked), forward(model, context, masked), atol=1e-6
    )


def test_learned_positions_start_at_the_fixed_embedding() -> None:
    # (The contract battery checks that the learned table gets a gradient.)
    learned = MMDiT(mmdit_config(), key=jax.random.key(0))
    fixed = MMDiT(replace(mmdit_config(), positions="sincos"), key=jax.random.key(0))
    assert fixed.pos_embed is None and learned.pos_embed is not None
    np.testing.assert_allclose(learned.positions(jnp.float32), fixed.positions(jnp.float32))


def test_bad_shapes_and_values_name_the_field() -> None:
    model = MMDiT(mmdit_config(), key=jax.random.key(0))
    x, t, context = _inputs()
    with pytest.raises(ValueError, match=re.escape("MMDiTConfig.context_dim=12")):
        jax.eval_shape(model, x, t, context[:, :5])
    with pytest.raises(ValueError, match=re.escape("MMDiTConfig.input_size=8")):
        jax.eval_shape(model, x[:, :4, :4], t, context)
    with pytest.raises(ModelConfigError, match=re.escape("MMDiTConfig.patch_size=3 must divide input_size=8")):
        replace(mmdit_config(), patch_size=3)
    with pytest.raises(ModelConfigError, match=re.escape("MMDiTConfig.positions='rope' is unknown")):
        MMDiTConfig(positions="rope")
