"""assert_parity against numpy's allclose rule and torch references."""

import jax.numpy as jnp
import numpy as np
import pytest

from xax.testing import assert_parity

NEEDS_TORCH = "needs the torch extra (torch, transformers), which `make install` adds on Python 3.11 only"
torch = pytest.importorskip("torch", reason=NEEDS_TORCH)

RTOL, ATOL = 1e-5, 1e-6


def _inputs() -> list[np.ndarray]:
    return [np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)]


def test_matching_functions_pass_and_report_small_errors() -> None:
    errors = assert_parity(jnp.tanh, torch.tanh, _inputs(), rtol=RTOL, atol=ATOL)
    assert len(errors) == 1 and errors[0].ok and errors[0].shape == (3, 5)
    assert errors[0].max_abs < 1e-6


def test_pytrees_are_compared_leaf_by_leaf() -> None:
    errors = assert_parity(
        lambda x: {"a": jnp.sin(x), "b": (jnp.cos(x), x.sum())},
        lambda x: {"a": torch.sin(x), "b": (torch.cos(x), x.sum())},
        _inputs(),
        rtol=RTOL,
        atol=ATOL,
    )
    assert [e.name for e in errors] == ["['a']", "['b'][0]", "['b'][1]"]


def test_a_difference_is_reported_with_its_output_index_and_size() -> None:
    def perturbed(x: jnp.ndarray) -> dict:
        return {"a": jnp.sin(x), "b": jnp.cos(x).at[1, 2].add(0.01)}

    with pytest.raises(AssertionError) as failure:
        assert_parity(perturbed, lambda x: {"a": torch.sin(x), "b": torch.cos(x)}, _inputs(), rtol=RTOL, atol=ATOL)
    report = str(failure.value)
    assert "✗ output ['b'] shape (3, 5): 1/15 elements differ" in report
    assert "max abs error 0.01 at (1, 2)" in report
    assert "  output ['a'] shape (3, 5): ok" in report


@pytest.mark.parametrize("scale", [1e-8, 3e-7, 1e-6, 1e-4])
def test_the_verdict_and_count_are_numpys_isclose(scale: float) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64,)).astype(np.float32)
    noise = (scale * rng.normal(size=(64,))).astype(np.float32)
    rtol, atol = 1e-5, 1e-6
    differ = int(np.sum(~np.isclose(x + noise, x, rtol=rtol, atol=atol)))
    if differ == 0:
        assert_parity(lambda v: v + jnp.asarray(noise), lambda v: v, [x], rtol=rtol, atol=atol)
    else:
        with pytest.raises(AssertionError, match=f" {differ}/64 elements differ"):
            assert_parity(lambda v: v + jnp.asarray(noise), lambda v: v, [x], rtol=rtol, atol=atol)


def test_nan_matches_nan_only() -> None:
    x = np.array([np.nan, 1.0], dtype=np.float32)
    assert_parity(lambda v: v, lambda v: v, [x], rtol=RTOL, atol=ATOL)
    with pytest.raises(AssertionError, match="1/2 elements differ"):
        assert_parity(lambda v: v, lambda v: torch.nan_to_num(v), [x], rtol=RTOL, atol=ATOL)


def test_shape_and_structure_mismatches_are_named() -> None:
    with pytest.raises(AssertionError, match=r"shape \(3, 5\) in jax, \(5, 3\) in torch"):
        assert_parity(jnp.tanh, lambda x: torch.tanh(x).T, _inputs(), rtol=RTOL, atol=ATOL)
    with pytest.raises(AssertionError, match="different structures"):
        assert_parity(lambda x: (x, x), lambda x: [x, x], _inputs(), rtol=RTOL, atol=ATOL)


def test_integer_inputs_reach_torch_as_int64() -> None:
    tokens = np.arange(6).reshape(2, 3)
    table = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    embedding = torch.nn.Embedding.from_pretrained(torch.tensor(table))
    assert_parity(lambda t: jnp.asarray(table)[t], embedding, [tokens], rtol=0.0, atol=0.0)
