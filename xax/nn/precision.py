"""Compute dtypes by name, and mixed-precision matmuls (float32 results, low-precision backward pass).

``lax.dot_general(a, b, ..., preferred_element_type=float32)`` on bfloat16 operands gives float32
results (accurate logits and attention scores), but its transpose then multiplies the float32
cotangent by a bfloat16 operand, which XLA runs as a float32 (TF32) GEMM: on GPT-2 small's output
projection that made the backward pass's two vocabulary-sized GEMMs 4x slower than in bfloat16.
``mixed_dot_general`` keeps the float32 forward result and casts the cotangent to the operands'
dtype first, so the backward GEMMs run on the tensor cores in that dtype (accumulating in
float32), as ``torch.autocast`` does.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array

# The compute dtypes a config may name: the dtype of activations (and of the parameters as the
# forward pass uses them); the parameters themselves stay float32.
COMPUTE_DTYPES: dict[str, jnp.dtype] = {
    "float32": jnp.dtype(jnp.float32),
    "bfloat16": jnp.dtype(jnp.bfloat16),
    "float16": jnp.dtype(jnp.float16),
}

DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_dot_general(lhs: Array, rhs: Array, dimension_numbers: DimensionNumbers) -> Array:
    """``lax.dot_general`` with a float32 result and a backward pass in the operands' dtype.

    Args:
        lhs: The left operand (any floating dtype; both operands share it).
        rhs: The right operand.
        dimension_numbers: As ``lax.dot_general``'s ``(((lhs_contract), (rhs_contract)),
            ((lhs_batch), (rhs_batch)))``.

    Returns:
        The product in float32. Its gradients with respect to ``lhs`` and ``rhs`` are those of the
        same product computed in the operands' dtype, applied to the cotangent cast to that dtype;
        with float32 operands they equal the plain ``dot_general``'s exactly.

    Examples:
        >>> import jax.numpy as jnp
        >>> a = jnp.ones((2, 3), jnp.bfloat16)
        >>> out = mixed_dot_general(a, a, (((1,), (1,)), ((), ())))  # a @ a.T
        >>> out.dtype, out.tolist()
        (dtype('float32'), [[3.0, 3.0], [3.0, 3.0]])
    """
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)


def _forward(lhs: Array, rhs: Array, dimension_numbers: DimensionNumbers) -> tuple[Array, tuple[Array, Array]]:
    return mixed_dot_general(lhs, rhs, dimension_numbers), (lhs, rhs)


def _backward(dimension_numbers: DimensionNumbers, residuals: tuple[Array, Array], cotangent: Array) -> tuple:
    lhs, rhs = residuals
    if lhs.dtype != rhs.dtype:
        raise TypeError(f"mixed_dot_general: operands must share a dtype, got {lhs.dtype} and {rhs.dtype}")

    def low_precision(a: Array, b: Array) -> Array:
        return jax.lax.dot_general(a, b, dimension_numbers, preferred_element_type=lhs.dtype)

    # Transposes of the product in each operand, without evaluating the product itself.
    cotangent = cotangent.astype(lhs.dtype)
    (d_lhs,) = jax.linear_transpose(lambda a: low_precision(a, rhs), lhs)(cotangent)
    (d_rhs,) = jax.linear_transpose(lambda b: low_precision(lhs, b), rhs)(cotangent)
    return d_lhs, d_rhs


mixed_dot_general.defvjp(_forward, _backward)
