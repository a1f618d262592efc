"""What ``benchmarks.profile_tools`` says a kernel computes, checked on modules compiled for the CPU."""

import inspect

import jax
import jax.numpy as jnp

from benchmarks.profile_tools import KernelTime, format_explained, fusions_of, type_bytes


def gelu_step(x: jax.Array, w: jax.Array) -> jax.Array:
    hidden = jax.nn.gelu(x @ w)
    return (hidden * 2 + 1).sum()


GELU_LINE = inspect.getsourcelines(gelu_step)[1] + 1  # the line of ``jax.nn.gelu(x @ w)``


def compiled_text() -> str:
    x, w = jnp.ones((64, 32), jnp.float32), jnp.ones((32, 16), jnp.float32)
    text = jax.jit(jax.grad(gelu_step)).lower(x, w).compile().as_text()
    assert text is not None
    return text


def test_type_bytes() -> None:
    assert type_bytes("bf16[2,3]{1,0}") == 12
    assert type_bytes("f32[]") == 4
    assert type_bytes("(f32[4], pred[8], s32[2,2])") == 16 + 8 + 16


def test_fusions_name_their_bytes_pass_and_source_line() -> None:
    fusions = fusions_of(compiled_text())
    # The GELU and its derivative: one (64, 16) float32 elementwise fusion of the forward and the
    # backward, reading the (64, 16) matmul output and writing a (64, 16) result.
    elementwise = [f for f in fusions.values() if f.output == "f32[64,16]" and f.passes == "fwd+bwd"]
    assert len(elementwise) == 1, fusions
    gelu = elementwise[0]
    assert gelu.bytes_in == 64 * 16 * 4 and gelu.bytes_out == 64 * 16 * 4
    assert gelu.sources[0] == f"{__name__.rsplit('.', 1)[-1]}.py:{GELU_LINE}"
    assert "." not in gelu.name  # as the profiler names kernels: fusion.12 -> fusion_12
    assert all(f.passes in ("fwd", "bwd", "fwd+bwd", "-") for f in fusions.values())


def test_format_explained_rates_only_kernels_of_the_module() -> None:
    text = compiled_text()
    name = next(f.name for f in fusions_of(text).values() if f.passes == "fwd+bwd")
    rows = [
        KernelTime("/device:GPU:0", "stream", "some_cudnn_kernel", 4, 1.0),
        KernelTime("/device:GPU:0", "stream", name, 2, 0.002),  # 2 calls of 1 microsecond each
    ]
    table = format_explained(rows, text, steps=2, top=5)
    lines = table.splitlines()
    assert len(lines) == 3 and "some_cudnn_kernel" not in table
    # 8,192 bytes moved per call in 1 microsecond: 8.2 GB/s.
    assert lines[2].startswith("| 0.001 | 1 | 0.0 | 8 | `f32[64,16]` | fwd+bwd |"), lines[2]
