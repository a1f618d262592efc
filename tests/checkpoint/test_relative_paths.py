"""Checkpoint folders given as relative paths (as a user types them) are written and read back."""

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xax.checkpoint import CheckpointManager, CheckpointOptions, restore_latest, restore_weights


def test_a_relative_checkpoint_folder_saves_and_restores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    manager = CheckpointManager(Path("checkpoints"), CheckpointOptions(keep_last=2, async_save=False))
    for step in (1, 2, 3):
        manager.save(step, {"params": model, "step": jnp.asarray(step)}, {"note": step})
    manager.close()
    assert manager.steps() == [2, 3]
    assert (tmp_path / "checkpoints" / "3" / "state").is_dir()

    restored = restore_latest(Path("checkpoints"), {"params": model, "step": jnp.asarray(0)})
    assert restored is not None
    assert (restored.step, int(restored.tree["step"]), restored.metadata) == (3, 3, {"note": 3})

    template = eqx.nn.Linear(3, 2, key=jax.random.key(1))
    weights = restore_weights(template, Path("checkpoints"), 2)
    np.testing.assert_array_equal(weights.weight, model.weight)
