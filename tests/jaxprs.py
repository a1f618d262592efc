"""Reading jaxprs in tests: every equation, nested ones included."""

import jax.extend
import numpy as np


def equations(jaxpr: jax.extend.core.Jaxpr) -> list[jax.extend.core.JaxprEqn]:
    """The equations of ``jaxpr`` and of every jaxpr nested in their parameters (jit, custom_vjp, scan)."""
    found = []
    for eqn in jaxpr.eqns:
        found.append(eqn)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if isinstance(inner, jax.extend.core.Jaxpr):
                found.extend(equations(inner))
    return found


def dot_operand_dtypes(jaxpr: jax.extend.core.Jaxpr) -> list[list[np.dtype]]:
    """The operand dtypes of every ``dot_general`` in ``jaxpr``, nested ones included."""
    dots = [eqn for eqn in equations(jaxpr) if eqn.primitive.name == "dot_general"]
    return [[var.aval.dtype for var in eqn.invars] for eqn in dots]  # ty: ignore[missing-attribute]
