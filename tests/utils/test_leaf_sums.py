"""``xax.utils.layer_stats.leaf_sums``: per-leaf sums with the small leaves reduced together."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xax.utils.layer_stats import SMALL_LEAF, leaf_sums

SHAPES = [(768,), (3, 768), (2304,), (3072,), (768,), (SMALL_LEAF,), (SMALL_LEAF + 1,), (300, 400), (0,), (1,), (5,)]


def arrays(seed: int = 0) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in SHAPES]


def test_each_sum_is_its_own_leafs() -> None:
    values = arrays()
    got = np.asarray(jax.jit(leaf_sums)(values))
    expected = np.array([np.sum(np.asarray(v, np.float64)) for v in values])
    assert got.shape == (len(SHAPES),) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)


def test_a_nan_stays_in_its_leaf_and_bf16_is_summed_in_float32() -> None:
    values = arrays(1)
    values[2] = values[2].at[7].set(jnp.nan)  # a small leaf stacked with others of its width
    values[4] = values[4].astype(jnp.bfloat16)
    got = np.asarray(leaf_sums(values))
    assert np.isnan(got[2]) and np.isfinite(np.delete(got, 2)).all()
    np.testing.assert_allclose(got[4], np.sum(np.asarray(values[4], np.float64)), rtol=1e-5, atol=1e-3)


def test_small_leaves_take_one_reduction_per_width() -> None:
    """Eleven leaves, six of them large, empty or alone in their width: eight reductions, not eleven."""
    jaxpr = jax.make_jaxpr(leaf_sums)(arrays())
    reductions = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "reduce_sum"]
    # Stacked: width 1024 (768, 768) and 4096 (2304, 3 x 768, 3072). Alone: SMALL_LEAF (width 65536), 1 and
    # 5 (widths 1 and 8), the empty leaf, and the large SMALL_LEAF + 1 and 300 x 400.
    assert len(reductions) == 2 + 6


def test_arrays_kept_apart_are_summed_alone() -> None:
    """A sharded leaf (``together`` False) is not stacked: the two 768-wide leaves then reduce apart."""
    values = arrays()
    together = [index != 4 for index in range(len(values))]
    jaxpr = jax.make_jaxpr(lambda v: leaf_sums(v, together))(values)
    reductions = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "reduce_sum"]
    assert len(reductions) == 2 + 6 + 1  # leaf 0 is now alone in width 1024, and leaf 4 on its own
    np.testing.assert_allclose(np.asarray(leaf_sums(values, together)), np.asarray(leaf_sums(values)), rtol=1e-6)


def test_a_flag_per_array_is_required() -> None:
    with pytest.raises(ValueError, match="one per array"):
        leaf_sums(arrays(), [True])
