"""The DiT ablation's variants compute the library's DiT, its lowered steps hold what its docstring
says, and its CPU check (``--tiny``) times every variant."""

import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import dit_ablation
from benchmarks.dit_throughput import make_setup
from tests.benchmarks.results import read_results
from xax.arch.dit import DiT


def _perturbed_dit() -> DiT:
    """A tiny float32 DiT with every weight moved off its initialization (adaLN-Zero would make each
    block the identity and the output zero, and hide any difference)."""
    dit = DiT(make_setup(True, "auto").model, key=jax.random.key(0))
    params, static = eqx.partition(dit, eqx.is_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    moved = [leaf + 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys, strict=True)]
    return eqx.combine(jax.tree.unflatten(treedef, moved), static)


@pytest.mark.parametrize("change", ["default", *dit_ablation.BATCHED_CHANGES])
def test_batched_forward_equals_the_library(change: str) -> None:
    dit = _perturbed_dit()
    cfg = dit.config
    options = dit_ablation.Options(**{**dit_ablation.BATCHED_CHANGES.get(change, {}), "attention": "xla"})
    batched = dit_ablation.Batched.from_dit(dit, options)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, cfg.in_channels, cfg.input_size, cfg.input_size), dtype=np.float32))
    t = jnp.asarray([0.1, 0.5, 0.9], jnp.float32)
    y = jnp.asarray([1, 4, cfg.num_classes], jnp.int32)
    expected = jax.vmap(dit)(x, t, y)
    assert float(jnp.abs(expected).max()) > 0.1  # the blocks do something
    # Float32 throughout, so the dtype options change nothing and only summation order differs.
    np.testing.assert_allclose(np.asarray(batched(x, t, y)), np.asarray(expected), rtol=1e-4, atol=1e-4)


def _stacked_pads(name: str) -> int:
    setup = make_setup(True, "auto")
    with jax.numpy_dtype_promotion("standard"):  # optax relies on it
        summary = dit_ablation.hlo_summary(dit_ablation.VARIANTS[name], setup, batch=3)
    return summary["jaxpr"].get("pad to a stacked (num_layers, ...) shape", 0)


def test_separate_blocks_remove_the_gradient_pads_of_stacked_weights() -> None:
    # Each block's slice of a stacked weight gets its gradient padded back to the stacked shape.
    assert _stacked_pads("xax") > 0 and _stacked_pads("batched") > 0
    assert _stacked_pads("batched_separate") == 0


def test_the_custom_gelu_and_norm_derivatives_keep_less_for_the_backward() -> None:
    """The compiled step's scratch memory: JAX's own derivatives of the GELU and the LayerNorm keep more."""
    setup = make_setup(True, "auto")
    with jax.numpy_dtype_promotion("standard"):  # optax relies on it
        sizes = {
            name: dit_ablation.compiled_temp_bytes(dit_ablation.VARIANTS[name], setup, batch=16)
            for name in ("xax_autodiff", "xax_autodiff_gelu", "xax")
        }
    assert sizes["xax_autodiff"] > sizes["xax_autodiff_gelu"] > sizes["xax"], sizes


@pytest.mark.slow
def test_dit_ablation_tiny(tmp_path: Path) -> None:
    # jax.nn's XLA attention and optax rely on standard dtype promotion, as the benchmark runs.
    with jax.numpy_dtype_promotion("standard"):
        dit_ablation.main(["--tiny", "--out", str(tmp_path)])
    rows = {row["variant"]: row for row in read_results(tmp_path, "dit_ablation_tiny")}
    assert set(dit_ablation.VARIANTS) <= set(rows)
    assert rows["xax"]["over_xax"] == 1.0
    # remat="none" is the default, so that variant is the library's step itself.
    assert rows["xax_remat_off"]["steps_per_s"] == "same as xax"
    measured = {name for name, row in rows.items() if not str(row["steps_per_s"]).startswith("same")}
    assert {"xax", "reference", "batched", "batched_separate", "xax_scan"} <= measured
    for name in measured:
        row = rows[name]
        assert isinstance(row["steps_per_s"], float) and row["steps_per_s"] > 0, (name, row)
        assert math.isclose(row["images_per_s"], 8 * row["steps_per_s"]) and math.isfinite(row["last_loss"])


@pytest.mark.slow
def test_xla_flag_sets_run_in_children_with_their_flags(tmp_path: Path) -> None:
    with jax.numpy_dtype_promotion("standard"):
        dit_ablation.main(["--tiny", "--which", "xax+default,xax+cublaslt", "--out", str(tmp_path)])
    rows = {row["variant"]: row for row in read_results(tmp_path, "dit_ablation_tiny")}
    assert set(rows) == {"xax+default", "xax+cublaslt"}
    assert "--xla_gpu_enable_cublaslt=true" in rows["xax+cublaslt"]["xla_flags"]
    assert "cublaslt" not in rows["xax+default"]["xla_flags"]
    assert rows["xax+default"]["over_xax"] == 1.0
    for row in rows.values():
        assert isinstance(row["steps_per_s"], float) and row["steps_per_s"] > 0, row
    # The flag is for GPUs: on the CPU both children compute the same step, hence the same loss.
    assert rows["xax+cublaslt"]["last_loss"] == rows["xax+default"]["last_loss"]


def test_unknown_flag_set_is_named() -> None:
    with pytest.raises(SystemExit, match=r"xax\+nonsense.*XLA flag set"):
        dit_ablation.main(["--tiny", "--which", "xax+nonsense"])
