"""The hand-written GPT-2 of the benchmarks computes GPT-2 (PyTorch's nanoGPT layout and xax's
``Transformer``, with the same weights) and trains."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import gpt2_reference
from benchmarks.gpt2_throughput import make_setup, reference_shape
from xax.arch import Transformer

NEEDS_TORCH = "needs the torch extra (torch, transformers), which `make install` adds on Python 3.11 only"


def moved(params: Any, scale: float = 0.2) -> Any:
    """Every weight moved off its initialization (unit gains and zero biases would hide a swapped one)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noisy = [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def tokens(shape: gpt2_reference.GPTShape, batch: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, shape.vocab_size, (batch, shape.block_size), dtype=np.int32)


def test_reference_computes_pytorchs_gpt2() -> None:
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    from benchmarks.torch_models import GPT, GPTShape

    shape = reference_shape(make_setup(True, "auto").model)
    params = moved(gpt2_reference.init_params(shape, jax.random.key(0)))
    torch_shape = GPTShape(shape.vocab_size, shape.block_size, shape.n_embd, shape.n_layer, shape.n_head, shape.eps)
    model = GPT(torch_shape)
    as_torch = lambda a: torch.from_numpy(np.array(a))  # noqa: E731  (a writable copy)
    state: dict[str, Any] = {
        "transformer.wte.weight": as_torch(params["wte"]),
        "transformer.wpe.weight": as_torch(params["wpe"]),
        "transformer.ln_f.weight": as_torch(params["ln_f"]["g"]),
        "transformer.ln_f.bias": as_torch(params["ln_f"]["b"]),
    }
    names = {"ln_1": "ln_1", "ln_2": "ln_2", "c_attn": "attn.c_attn", "c_proj": "attn.c_proj"}
    names |= {"c_fc": "mlp.c_fc", "mlp_proj": "mlp.c_proj"}
    for i, block in enumerate(params["blocks"]):
        for ours, theirs in names.items():
            layer = block[ours]
            weight = layer["g"] if "g" in layer else np.asarray(layer["w"]).T  # torch's Linear is (out, in)
            state[f"transformer.h.{i}.{theirs}.weight"] = as_torch(weight)
            state[f"transformer.h.{i}.{theirs}.bias"] = as_torch(layer["b"])
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state)
    ids = tokens(shape)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids).long()).numpy()
    got = gpt2_reference.forward(params, jnp.asarray(ids), shape, "xla")
    assert float(np.abs(expected).std()) > 0.5
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_reference_computes_xaxs_gpt2_with_as_many_parameters() -> None:
    setup = make_setup(True, "auto")
    shape = reference_shape(setup.model)
    model = Transformer(setup.model.with_updates(compute_dtype="float32"), key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    model = eqx.combine(moved(params), static)
    cat = lambda *layers: {  # noqa: E731  (xax's (out, in) q, k, v -> the fused (in, 3 out))
        "w": jnp.concatenate([layer.weight.T for layer in layers], axis=1),
        "b": jnp.concatenate([layer.bias for layer in layers]),
    }
    dense = lambda layer: {"w": layer.weight.T, "b": layer.bias}  # noqa: E731
    norm = lambda layer: {"g": layer.weight, "b": layer.bias}  # noqa: E731
    blocks = []
    for layer in model.layers:
        attn = layer.self_attn
        blocks.append(
            {
                "ln_1": norm(layer.input_layernorm),
                "c_attn": cat(attn.q_proj, attn.k_proj, attn.v_proj),
                "c_proj": dense(attn.o_proj),
                "ln_2": norm(layer.post_attention_layernorm),
                "c_fc": dense(layer.mlp.up_proj),
                "mlp_proj": dense(layer.mlp.down_proj),
            }
        )
    ref = {
        "wte": model.embed_tokens.weight,
        "wpe": model.embed_positions.weight,
        "blocks": blocks,
        "ln_f": norm(model.norm),
    }
    ids = jnp.asarray(tokens(shape))
    expected, _ = model(ids)
    np.testing.assert_allclose(
        np.asarray(gpt2_reference.forward(ref, ids, shape, "xla")), np.asarray(expected), rtol=1e-4, atol=1e-4
    )
    # Same parameters, hence the same FLOPs per token in the throughput comparison.
    assert gpt2_reference.num_params(gpt2_reference.init_params(shape, jax.random.key(0))) == sum(
        leaf.size for leaf in jax.tree.leaves(params)
    )


def test_reference_trains_on_cpu() -> None:
    shape = reference_shape(make_setup(True, "auto").model)
    params = gpt2_reference.init_params(shape, jax.random.key(0))
    optimizer = optax.adamw(3e-3)
    opt_state = optimizer.init(params)
    step = gpt2_reference.make_train_step(shape, optimizer, "xla")
    # Windows of a repeating pattern: learnable in a few steps.
    windows = jnp.asarray(np.tile(np.arange(shape.block_size + 1) % 7, (8, 1)), jnp.int32)
    losses = []
    with jax.numpy_dtype_promotion("standard"):
        for i in range(12):
            params, opt_state, loss = step(params, opt_state, windows, jnp.asarray([i % 8, (i + 3) % 8]))
            losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses
