"""A contract battery every model in ``xax.arch`` must pass.

A model family describes each model as a ``ContractCase``: how to build it, example inputs, a
forward function, a scalar loss, optionally a low-precision variant, and a list of
``Equivalence`` pairs that must agree (scanned layers vs a loop, cached decoding vs the full
forward, recurrent vs parallel mode, sampler steps vs a closed form...). Each ``CHECKS`` function
takes one case and asserts one contract; a test module parametrizes over cases x checks::

    CASES = [*transformer_cases(), *ssm_cases()]

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_contract(case, check):
        check(case)
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# The relative L2 error allowed between a bfloat16-compute model and its float32 twin: bf16 keeps
# 8 mantissa bits (2^-8 = 0.4% per rounding) and a few layers compound that.
BF16_REL_TOL = 5e-2


@dataclass(frozen=True)
class Equivalence:
    """Two computations that must agree.

    Attributes:
        name: What is compared, e.g. "cache equals full forward".
        compute: Returns ``(reference, candidate)``, two pytrees of arrays with the same structure.
        atol: The absolute tolerance.
        rtol: The relative tolerance.
    """

    name: str
    compute: Callable[[], tuple[Any, Any]]
    atol: float
    rtol: float = 0.0


@dataclass(frozen=True)
class ContractCase:
    """One model under the battery.

    Attributes:
        name: The test id.
        make_model: Builds the float32 model from a key.
        make_inputs: Builds example inputs (a tuple) from a key.
        apply: The forward pass ``apply(model, inputs) -> array``.
        loss: A scalar training loss ``loss(model, inputs) -> array``.
        make_low_precision_model: Builds the same model (same key, same weights) computing in a
            low-precision dtype, or None if the family has no dtype policy.
        output_dtype: The dtype ``apply`` must return under low precision (None: not declared).
        param_dtype: The dtype every floating parameter keeps under low precision.
        equivalences: Returns the pairs that must agree (built lazily, so collection stays fast).
    """

    name: str
    make_model: Callable[[jax.Array], eqx.Module]
    make_inputs: Callable[[jax.Array], tuple]
    apply: Callable[[Any, tuple], jax.Array]
    loss: Callable[[Any, tuple], jax.Array]
    make_low_precision_model: Callable[[jax.Array], eqx.Module] | None = None
    output_dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    equivalences: Callable[[], list[Equivalence]] = field(default=lambda: [])


def _model_and_inputs(case: ContractCase) -> tuple[Any, tuple]:
    return case.make_model(jax.random.key(0)), case.make_inputs(jax.random.key(1))


def check_jits(case: ContractCase) -> None:
    """The forward pass jits, traces once for same-shaped inputs, and matches eager execution."""
    model, inputs = _model_and_inputs(case)
    traces = []

    @eqx.filter_jit
    def forward(model: Any, inputs: tuple) -> jax.Array:
        traces.append(1)
        return case.apply(model, inputs)

    jitted = forward(model, inputs)
    forward(model, case.make_inputs(jax.random.key(2)))
    assert len(traces) == 1, f"{case.name}: the forward retraced for same-shaped inputs"
    eager = case.apply(model, inputs)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5, rtol=1e-5)


def check_finite_gradients(case: ContractCase) -> None:
    """Every floating parameter gets a finite gradient that is not identically zero (it is used)."""
    model, inputs = _model_and_inputs(case)
    grads = eqx.filter_jit(eqx.filter_grad(case.loss))(model, inputs)
    leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert leaves, f"{case.name}: no gradient leaves"
    for path, grad in leaves:
        name = jax.tree_util.keystr(path)
        assert bool(jnp.all(jnp.isfinite(grad))), f"{case.name}: non-finite gradient at {name}"
        assert bool(jnp.any(grad != 0)), f"{case.name}: zero gradient at {name} (parameter unused?)"


def check_dtype_policy(case: ContractCase) -> None:
    """Under low-precision compute, parameters keep their dtype, outputs have the declared dtype and
    stay within bf16 rounding of the float32 model."""
    if case.make_low_precision_model is None:
        pytest.skip(f"{case.name} declares no dtype policy")
    model, inputs = _model_and_inputs(case)
    low = case.make_low_precision_model(jax.random.key(0))
    for leaf in jax.tree.leaves(eqx.filter(low, eqx.is_inexact_array)):
        assert leaf.dtype == case.param_dtype, f"{case.name}: a parameter is {leaf.dtype}, not {case.param_dtype}"
    out = eqx.filter_jit(case.apply)(low, inputs)
    if case.output_dtype is not None:
        assert out.dtype == case.output_dtype, f"{case.name}: output is {out.dtype}, not {case.output_dtype}"
    ref = eqx.filter_jit(case.apply)(model, inputs)
    error = float(jnp.linalg.norm((out.astype(jnp.float32) - ref).ravel()) / jnp.linalg.norm(ref.ravel()))
    assert error < BF16_REL_TOL, f"{case.name}: low-precision output is {error:.3g} away from float32"
    grads = eqx.filter_jit(eqx.filter_grad(case.loss))(low, inputs)
    for leaf in jax.tree.leaves(grads):
        assert leaf.dtype == case.param_dtype
        assert bool(jnp.all(jnp.isfinite(leaf)))


def check_equivalences(case: ContractCase) -> None:
    """Every declared pair of computations agrees within its tolerance."""
    pairs = case.equivalences()
    if not pairs:
        pytest.skip(f"{case.name} declares no equivalences")
    for pair in pairs:
        reference, candidate = pair.compute()
        ref_leaves, cand_leaves = jax.tree.leaves(reference), jax.tree.leaves(candidate)
        assert len(ref_leaves) == len(cand_leaves), f"{case.name}: {pair.name}: structures differ"
        for ref, cand in zip(ref_leaves, cand_leaves):
            np.testing.assert_allclose(
                np.asarray(cand), np.asarray(ref), atol=pair.atol, rtol=pair.rtol, err_msg=f"{case.name}: {pair.name}"
            )


CHECKS: tuple[Callable[[ContractCase], None], ...] = (
    check_jits,
    check_finite_gradients,
    check_dtype_policy,
    check_equivalences,
)
