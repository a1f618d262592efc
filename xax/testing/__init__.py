"""Test helpers: parity of JAX code against a PyTorch reference, and of parallel plans against one device."""

from xax.testing.parity import OutputError as OutputError
from xax.testing.parity import assert_parity as assert_parity
from xax.testing.plan_parity import PlanCase as PlanCase
from xax.testing.plan_parity import run_parity as run_parity
