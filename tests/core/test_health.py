"""The health record: accumulated inside jit, read and merged on the host."""

import jax
import jax.numpy as jnp

from xax.core.health import Health, NonfiniteCause


@jax.jit
def record_window(applied: jax.Array, causes: jax.Array, leaves: jax.Array) -> Health:
    health = Health.zeros()
    streak = jnp.zeros((), jnp.int32)
    for i in range(applied.shape[0]):
        streak = jnp.where(applied[i], 0, streak + 1).astype(jnp.int32)
        health = health.record(step=i + 5, applied=applied[i], cause=causes[i], leaf=leaves[i], streak=streak)
    return health


def test_record_keeps_the_first_bad_step_and_counts_every_one() -> None:
    applied = jnp.array([True, False, False, True, False])
    causes = jnp.array([0, NonfiniteCause.GRADIENT, NonfiniteCause.LOSS, 0, NonfiniteCause.UPDATE], jnp.int32)
    leaves = jnp.array([0, 3, 0, 0, 1], jnp.int32)
    health = record_window(applied, causes, leaves).on_host()
    assert health == Health(
        nonfinite_steps=3, first_step=6, first_cause=NonfiniteCause.GRADIENT, first_leaf=3, max_streak=2
    )
    assert not health.ok
    assert health.describe(["a", "b", "c"]) == "non-finite gradient of c at step 6 (3 step(s) skipped)"


def test_a_finite_window_is_ok_and_merges_away() -> None:
    finite = record_window(jnp.array([True, True]), jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32)).on_host()
    assert finite == Health() and finite.ok
    bad = Health(nonfinite_steps=2, first_step=9, first_cause=NonfiniteCause.UPDATE, first_leaf=1, max_streak=2)
    assert finite.merged(bad) == bad
    assert bad.merged(finite) == bad
    later = Health(nonfinite_steps=1, first_step=12, first_cause=NonfiniteCause.LOSS, first_leaf=0, max_streak=3)
    assert bad.merged(later) == Health(
        nonfinite_steps=3, first_step=9, first_cause=NonfiniteCause.UPDATE, first_leaf=1, max_streak=3
    )
    assert bad.describe(["w"]) == "update made w non-finite (check the learning rate) at step 9 (2 step(s) skipped)"
