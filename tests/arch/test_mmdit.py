"""The whole mmDiT: its positions, and one-line errors for bad shapes and values. (The contract battery checks
that every weight gets a gradient, those reading the context included, and that masked context tokens
change nothing; tests/arch/test_dit.py checks the joint attention of a block against a float64 reference.)"""

import re
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.arch.contract_cases import mmdit_config
from xax.arch import MMDiT, MMDiTConfig, ModelConfigError


def _inputs() -> tuple[jax.Array, jax.Array, jax.Array]:
    config = mmdit_config()
    x = jax.random.normal(jax.random.key(1), (config.in_channels, config.input_size, config.input_size))
    context = jax.random.normal(jax.random.key(2), (4, config.context_dim))
    return x, jnp.asarray(0.3), context


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
