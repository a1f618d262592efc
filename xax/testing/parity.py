"""Parity checks: a JAX function against its PyTorch reference on the same inputs.

``assert_parity`` runs both functions on the same numpy inputs and compares the outputs leaf by
leaf with numpy's ``allclose`` rule, ``|jax - torch| <= atol + rtol * |torch|`` (the torch output
is the reference). On failure the report names each output by its pytree path and gives its
largest absolute and relative errors, where they occur and the values there. torch is imported
only when a check runs.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class OutputError:
    """How one output leaf differs from its reference.

    Attributes:
        name: The leaf's pytree path (``"[0]"``, ``"['logits']"``; empty for a single array).
        shape: The leaf's shape.
        max_abs: The largest ``|jax - torch|``.
        max_abs_index: Where it occurs.
        max_rel: The largest ``|jax - torch| / |torch|`` over nonzero reference values.
        max_rel_index: Where it occurs.
        mismatched: How many elements break the tolerance.
    """

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_abs_index: tuple[int, ...]
    max_rel: float
    max_rel_index: tuple[int, ...]
    mismatched: int

    @property
    def ok(self) -> bool:
        return self.mismatched == 0

    def describe(self, actual: np.ndarray, expected: np.ndarray) -> str:
        size = int(np.prod(self.shape))
        status = "ok" if self.ok else f"{self.mismatched}/{size} elements differ"
        return (
            f"output {self.name or '(the only one)'} shape {self.shape}: {status}; "
            f"max abs error {self.max_abs:.3g} at {self.max_abs_index} "
            f"(jax {actual[self.max_abs_index]!r}, torch {expected[self.max_abs_index]!r}); "
            f"max rel error {self.max_rel:.3g} at {self.max_rel_index}"
        )


def _torch_to_numpy(value: Any) -> np.ndarray:
    import torch  # optional: only parity checks need it

    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    return np.asarray(value)


def _to_torch(value: np.ndarray) -> Any:
    import torch

    return torch.tensor(np.asarray(value))


def compare(name: str, actual: np.ndarray, expected: np.ndarray, *, rtol: float, atol: float) -> OutputError:
    """Measures how ``actual`` departs from ``expected`` under ``allclose(rtol, atol)`` (NaNs match NaNs)."""
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    diff = np.abs(a - e)
    same = (a == e) | (np.isnan(a) & np.isnan(e))  # equal infinities and NaN against NaN agree
    diff = np.where(same, 0.0, np.where(np.isnan(diff), np.inf, diff))
    rel = np.where(np.abs(e) > 0, diff / np.where(np.abs(e) > 0, np.abs(e), 1.0), np.where(diff > 0, np.inf, 0.0))
    shape = tuple(actual.shape)
    if not shape:
        diff, rel = diff.reshape(1), rel.reshape(1)
    abs_at = np.unravel_index(int(np.argmax(diff)), diff.shape)
    rel_at = np.unravel_index(int(np.argmax(rel)), rel.shape)
    return OutputError(
        name=name,
        shape=shape,
        max_abs=float(diff[abs_at]),
        max_abs_index=tuple(int(i) for i in abs_at) if shape else (),
        max_rel=float(rel[rel_at]),
        max_rel_index=tuple(int(i) for i in rel_at) if shape else (),
        mismatched=int(np.sum(diff > atol + rtol * np.abs(np.nan_to_num(e)))),
    )


def assert_parity(
    jax_fn: Callable[..., Any],
    torch_fn: Callable[..., Any],
    inputs: Sequence[Any],
    *,
    rtol: float,
    atol: float,
) -> list[OutputError]:
    """Runs ``jax_fn`` and ``torch_fn`` on the same inputs and asserts their outputs agree.

    Args:
        jax_fn: The function under test; called with the inputs as JAX arrays.
        torch_fn: The PyTorch reference; called with the inputs as torch tensors under
            ``torch.no_grad()``. It returns tensors, or tuples/lists/dicts of tensors shaped like
            ``jax_fn``'s output.
        inputs: The positional arguments, each a pytree of numpy arrays.
        rtol: The relative tolerance (against the torch value).
        atol: The absolute tolerance.

    Returns:
        The per-output errors (all within tolerance), e.g. to record in a benchmark.

    Raises:
        AssertionError: The outputs differ in structure, shape or value, with a report per output.
    """
    import torch

    jax_out = jax_fn(*jax.tree.map(jnp.asarray, tuple(inputs)))
    with torch.no_grad():
        torch_out = torch_fn(*jax.tree.map(_to_torch, tuple(inputs)))
    actual_leaves, actual_tree = jax.tree_util.tree_flatten_with_path(jax_out)
    expected_leaves, expected_tree = jax.tree.flatten(jax.tree.map(_torch_to_numpy, torch_out))
    if actual_tree != expected_tree:
        raise AssertionError(
            f"assert_parity: the outputs have different structures: jax {jax.tree.structure(jax_out)}, "
            f"torch {expected_tree}; return the same pytree (e.g. a tuple from both)"
        )
    errors, lines = [], []
    for (path, actual), expected in zip(actual_leaves, expected_leaves):
        name = jax.tree_util.keystr(path)
        actual = np.asarray(actual)
        if actual.shape != expected.shape:
            raise AssertionError(
                f"assert_parity: output {name or '(the only one)'} has shape {actual.shape} in jax, "
                f"{expected.shape} in torch"
            )
        error = compare(name, actual, expected, rtol=rtol, atol=atol)
        errors.append(error)
        lines.append(("  " if error.ok else "✗ ") + error.describe(actual, expected))
    if not all(e.ok for e in errors):
        raise AssertionError(f"assert_parity: outputs differ beyond rtol={rtol}, atol={atol}:\n" + "\n".join(lines))
    return errors
