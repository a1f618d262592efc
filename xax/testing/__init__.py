"""Test helpers: parity of JAX code against a PyTorch reference."""

from xax.testing.parity import OutputError as OutputError
from xax.testing.parity import assert_parity as assert_parity
