"""LoRA: exact formula, selection by path, adapter-only optimizer state, merging."""

from typing import cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xax.arch.transformer import Transformer, TransformerConfig
from xax.nn.lora import LoRALinear, apply_linear, apply_lora, linear_paths, lora_filter, merge_lora, partition_lora


def _trained(layer: LoRALinear) -> LoRALinear:
    """Gives B nonzero values, as after some training (it starts at zero)."""
    return eqx.tree_at(lambda n: n.lora_b, layer, jax.random.normal(jax.random.key(9), layer.lora_b.shape))


def test_lora_linear_formula_and_zero_init() -> None:
    base = eqx.nn.Linear(6, 5, key=jax.random.key(0))
    layer = LoRALinear(base, rank=2, alpha=4.0, key=jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (6,))
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(base(x)), atol=1e-6)
    layer = _trained(layer)
    assert base.bias is not None
    expected = base.weight @ x + base.bias + (4.0 / 2) * layer.lora_b @ (layer.lora_a @ x)
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(expected), atol=1e-5)


def test_merge_equals_lora_output() -> None:
    layer = _trained(LoRALinear(eqx.nn.Linear(6, 5, key=jax.random.key(0)), rank=3, alpha=1.5, key=jax.random.key(1)))
    merged = merge_lora(layer)
    assert type(merged) is eqx.nn.Linear
    x = jax.random.normal(jax.random.key(2), (4, 6))
    np.testing.assert_allclose(np.asarray(apply_linear(merged, x)), np.asarray(apply_linear(layer, x)), atol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_apply_lora_to_transformer_and_merge(scan_layers: bool) -> None:
    config = TransformerConfig.llama_tiny().with_updates(scan_layers=scan_layers, num_layers=2)
    model = Transformer(config, key=jax.random.key(0))
    lora = apply_lora(model, r"self_attn\.(q|v)_proj$", rank=2, alpha=4.0, key=jax.random.key(1))
    per_layer = 1 if scan_layers else config.num_layers
    assert (
        sum(isinstance(n, LoRALinear) for n in jax.tree.leaves(lora, is_leaf=lambda n: isinstance(n, LoRALinear)))
        == 2 * per_layer
    )
    assert linear_paths(lora) == linear_paths(model)

    tokens = jax.random.randint(jax.random.key(2), (2, 6), 0, config.vocab_size)
    logits = eqx.filter_jit(lambda m: m(tokens)[0])
    base_logits, lora_logits = logits(model), logits(lora)
    np.testing.assert_allclose(np.asarray(lora_logits), np.asarray(base_logits), atol=1e-5)  # B = 0 at init

    lora = jax.tree.map(
        lambda n: _trained(n) if isinstance(n, LoRALinear) else n, lora, is_leaf=lambda n: isinstance(n, LoRALinear)
    )
    lora_logits = logits(lora)
    assert float(jnp.max(jnp.abs(lora_logits - base_logits))) > 1e-3
    merged_logits = logits(merge_lora(lora))
    np.testing.assert_allclose(np.asarray(merged_logits), np.asarray(lora_logits), atol=1e-4)


def test_apply_lora_with_no_match_lists_paths() -> None:
    model = Transformer(TransformerConfig.gpt2_tiny(), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"matches no linear layer; paths are \['layers.0.self_attn.q_proj'"):
        apply_lora(model, "c_attn", rank=2, alpha=1.0, key=jax.random.key(1))


def test_optimizer_state_only_for_adapters() -> None:
    config = TransformerConfig.gpt2_tiny()
    model = apply_lora(
        Transformer(config, key=jax.random.key(0)), r"mlp\.(up|down)_proj", rank=2, alpha=2.0, key=jax.random.key(1)
    )
    adapters, frozen = partition_lora(model)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(adapters)
    adapter_leaves = jax.tree.leaves(adapters)
    # Two adapters (up, down) in each of the layers, each with A and B.
    assert len(adapter_leaves) == 4 * config.num_layers
    moments = [leaf for leaf in jax.tree.leaves(opt_state) if leaf.ndim > 0]
    assert sorted(m.shape for m in moments) == sorted([a.shape for a in adapter_leaves] * 2)

    tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, config.vocab_size)

    def loss_fn(adapters: eqx.Module) -> jax.Array:
        model = cast(Transformer, eqx.combine(adapters, frozen))
        logits, _ = model(tokens[:, :-1])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))

    loss_before = eqx.filter_jit(loss_fn)(adapters)
    grad_fn = eqx.filter_jit(eqx.filter_grad(loss_fn))
    for _ in range(3):
        grads = grad_fn(adapters)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int and float
            updates, opt_state = optimizer.update(grads, opt_state)
        adapters = eqx.apply_updates(adapters, updates)
    assert float(eqx.filter_jit(loss_fn)(adapters)) < float(loss_before)
    # Frozen weights are untouched by construction: they never entered the optimizer.
    trainable = jax.tree.leaves(lora_filter(model))
    assert sum(trainable) == 4 * config.num_layers
