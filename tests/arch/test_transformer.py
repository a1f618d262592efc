"""The transformer against Hugging Face GPT-2, Llama and Qwen2 (same weights, fp32 logits at 1e-4)."""

import re
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from xax.arch.transformer import Transformer, TransformerConfig
from xax.core.errors import ConfigError

NEEDS_TORCH = "needs the torch extra (torch, transformers), which `make install` adds on Python 3.11 only"

# Random weights of this scale give logits with a spread comparable to a trained model's.
WEIGHT_STD = 0.2


def _randomize(module: Any) -> None:
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, WEIGHT_STD)


def _load(model: Transformer, weights: dict[Callable, Any]) -> Transformer:
    """Sets each model leaf picked by a `where` function to the given torch tensor."""
    for where, tensor in weights.items():
        value = jnp.asarray(tensor.detach().numpy())
        old = where(model)
        assert old.shape == value.shape, f"shape {old.shape} != {value.shape}"
        model = eqx.tree_at(where, model, value)
    return model


def _gpt2_weights(hf: Any, layers: int) -> dict[Callable, Any]:
    sd = hf.state_dict()
    d = hf.config.n_embd
    w: dict[Callable, Any] = {
        lambda m: m.embed_tokens.weight: sd["transformer.wte.weight"],
        lambda m: m.embed_positions.weight: sd["transformer.wpe.weight"],
        lambda m: m.norm.weight: sd["transformer.ln_f.weight"],
        lambda m: m.norm.bias: sd["transformer.ln_f.bias"],
    }
    for i in range(layers):
        p = f"transformer.h.{i}."
        c_attn_w, c_attn_b = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]  # (d, 3d), (3d,)
        for j, name in enumerate(["q_proj", "k_proj", "v_proj"]):
            w[lambda m, i=i, n=name: getattr(m.layers[i].self_attn, n).weight] = c_attn_w[:, j * d : (j + 1) * d].T
            w[lambda m, i=i, n=name: getattr(m.layers[i].self_attn, n).bias] = c_attn_b[j * d : (j + 1) * d]
        w |= {
            lambda m, i=i: m.layers[i].self_attn.o_proj.weight: sd[p + "attn.c_proj.weight"].T,
            lambda m, i=i: m.layers[i].self_attn.o_proj.bias: sd[p + "attn.c_proj.bias"],
            lambda m, i=i: m.layers[i].input_layernorm.weight: sd[p + "ln_1.weight"],
            lambda m, i=i: m.layers[i].input_layernorm.bias: sd[p + "ln_1.bias"],
            lambda m, i=i: m.layers[i].post_attention_layernorm.weight: sd[p + "ln_2.weight"],
            lambda m, i=i: m.layers[i].post_attention_layernorm.bias: sd[p + "ln_2.bias"],
            lambda m, i=i: m.layers[i].mlp.up_proj.weight: sd[p + "mlp.c_fc.weight"].T,
            lambda m, i=i: m.layers[i].mlp.up_proj.bias: sd[p + "mlp.c_fc.bias"],
            lambda m, i=i: m.layers[i].mlp.down_proj.weight: sd[p + "mlp.c_proj.weight"].T,
            lambda m, i=i: m.layers[i].mlp.down_proj.bias: sd[p + "mlp.c_proj.bias"],
        }
    return w


def _llama_weights(hf: Any, layers: int, qkv_bias: bool, tied: bool) -> dict[Callable, Any]:
    sd = hf.state_dict()
    w: dict[Callable, Any] = {
        lambda m: m.embed_tokens.weight: sd["model.embed_tokens.weight"],
        lambda m: m.norm.weight: sd["model.norm.weight"],
    }
    if not tied:
        w[lambda m: m.lm_head.weight] = sd["lm_head.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ["q_proj", "k_proj", "v_proj", "o_proj"]:
            w[lambda m, i=i, n=name: getattr(m.layers[i].self_attn, n).weight] = sd[p + f"self_attn.{name}.weight"]
            if qkv_bias and name != "o_proj":
                w[lambda m, i=i, n=name: getattr(m.layers[i].self_attn, n).bias] = sd[p + f"self_attn.{name}.bias"]
        for name in ["gate_proj", "up_proj", "down_proj"]:
            w[lambda m, i=i, n=name: getattr(m.layers[i].mlp, n).weight] = sd[p + f"mlp.{name}.weight"]
        w[lambda m, i=i: m.layers[i].input_layernorm.weight] = sd[p + "input_layernorm.weight"]
        w[lambda m, i=i: m.layers[i].post_attention_layernorm.weight] = sd[p + "post_attention_layernorm.weight"]
    return w


def _compare(model: Transformer, hf: Any, vocab: int) -> None:
    import torch

    tokens = np.random.default_rng(0).integers(0, vocab, (2, 12))
    with torch.no_grad():
        expected = hf(torch.from_numpy(tokens)).logits.numpy()
    logits, _ = jax.jit(model.__call__)(jnp.asarray(tokens, dtype=jnp.int32))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=1e-4)


def test_gpt2_matches_transformers() -> None:
    pytest.importorskip("torch", reason=NEEDS_TORCH)
    transformers = pytest.importorskip("transformers", reason=NEEDS_TORCH)
    config = TransformerConfig.gpt2_tiny().with_updates(scan_layers=False)
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_seq_len,
        n_embd=config.d_model,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    _randomize(hf)
    hf.tie_weights()
    model = _load(Transformer(config, key=jax.random.key(0)), _gpt2_weights(hf, config.num_layers))
    _compare(model, hf, config.vocab_size)


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_llama_and_qwen_match_transformers(family: str) -> None:
    pytest.importorskip("torch", reason=NEEDS_TORCH)
    transformers = pytest.importorskip("transformers", reason=NEEDS_TORCH)
    config = (TransformerConfig.llama_tiny() if family == "llama" else TransformerConfig.qwen_tiny()).with_updates(
        scan_layers=False
    )
    common: dict[str, Any] = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
    }
    if family == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, attention_bias=False))
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    hf = hf.eval()
    _randomize(hf)
    hf.tie_weights()
    weights = _llama_weights(hf, config.num_layers, config.qkv_bias, config.tie_embeddings)
    model = _load(Transformer(config, key=jax.random.key(0)), weights)
    _compare(model, hf, config.vocab_size)


def test_gpt2_small_has_124m_parameters() -> None:
    shapes = eqx.filter_eval_shape(Transformer, TransformerConfig.gpt2_small(), key=jax.random.key(0))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes) if hasattr(leaf, "shape"))
    assert count == 124_439_808  # GPT2LMHeadModel's count (tied lm_head counted once)


def test_bfloat16_compute_keeps_float32_params_and_logits() -> None:
    config = TransformerConfig.llama_tiny().with_updates(compute_dtype="bfloat16")
    model = Transformer(config, key=jax.random.key(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))} == {jnp.dtype(jnp.float32)}
    hidden, cache = model.hidden_states(jnp.zeros((1, 4), jnp.int32), cache=model.init_cache(1, 8))
    assert hidden.dtype == jnp.bfloat16
    assert isinstance(cache, tuple) and all(layer.key.dtype == jnp.bfloat16 for layer in cache)


def test_dropout_is_active_only_with_a_key() -> None:
    config = TransformerConfig.gpt2_tiny().with_updates(dropout=0.5)
    model = Transformer(config, key=jax.random.key(0))
    tokens = jnp.zeros((1, 6), jnp.int32)
    a, _ = model(tokens)
    b, _ = model(tokens)
    c, _ = model(tokens, key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_kv_heads": 3}, "num_heads=4 is not divisible by num_kv_heads=3"),
        ({"norm": "batchnorm"}, "TransformerConfig.norm='batchnorm' is unknown"),
        ({"remat": "some"}, "TransformerConfig.remat='some' is unknown"),
        ({"d_model": 66}, "d_model=66 is not divisible by num_heads=4; set head_dim explicitly"),
    ],
)
def test_config_errors_name_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TransformerConfig.llama_tiny().with_updates(**changes)


def test_inference_mode_turns_dropout_off_even_with_a_key() -> None:
    config = TransformerConfig.gpt2_tiny().with_updates(dropout=0.5)
    model = Transformer(config, key=jax.random.key(0))
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    with_key, _ = model(tokens, key=jax.random.key(1))
    without_key, _ = model(tokens)
    in_inference, _ = eqx.nn.inference_mode(model)(tokens, key=jax.random.key(1))
    assert not np.allclose(np.asarray(with_key), np.asarray(without_key))
    np.testing.assert_array_equal(np.asarray(in_inference), np.asarray(without_key))


def test_sequence_longer_than_max_seq_len_is_refused_at_trace_time() -> None:
    model = Transformer(TransformerConfig.gpt2_tiny(), key=jax.random.key(0))
    too_long = jax.ShapeDtypeStruct((1, 65), jnp.int32)
    # Refused while tracing: no array of that shape is ever computed.
    with pytest.raises(ConfigError, match=r"a sequence of 65 tokens exceeds max_seq_len=64"):
        jax.eval_shape(lambda tokens: model(tokens)[0], too_long)
    with pytest.raises(ConfigError, match=r"slots=65 exceeds max_seq_len=64"):
        model.init_cache(1, 65)
    with pytest.raises(ValueError, match=r"6 tokens does not fit a KV cache of 4 slots"):
        model(jnp.zeros((1, 6), jnp.int32), cache=model.init_cache(1, 4))
    assert jax.eval_shape(lambda tokens: model(tokens)[0], jax.ShapeDtypeStruct((1, 64), jnp.int32)).shape == (
        1,
        64,
        128,
    )
    # RoPE has no table to run off: past max_seq_len it extrapolates, finite, as Hugging Face's Llama does.
    rope = Transformer(TransformerConfig.llama_tiny(), key=jax.random.key(0))
    assert bool(jnp.all(jnp.isfinite(rope(jnp.zeros((1, 65), jnp.int32))[0])))


@pytest.mark.parametrize("bad", [128, -1])
@pytest.mark.parametrize("preset", ["gpt2_tiny", "llama_tiny"])
def test_out_of_range_token_id_raises_in_checked_mode(preset: str, bad: int) -> None:
    model = Transformer(getattr(TransformerConfig, preset)(), key=jax.random.key(0))
    assert model.config.vocab_size == 128
    tokens = jnp.zeros((2, 6), jnp.int32).at[1, 3].set(bad)
    message = rf"tokens\[1, 3\] = {bad} is outside \[0, vocab_size=128\)"
    checked = checkify.checkify(lambda tokens: model(tokens, check_ids=True)[0])
    error, _ = jax.jit(checked)(tokens)
    with pytest.raises(checkify.JaxRuntimeError, match=message):
        error.throw()
    with pytest.raises(checkify.JaxRuntimeError, match=message):
        model(tokens, check_ids=True)  # an eager call raises at once
    error, _ = jax.jit(checked)(tokens.at[1, 3].set(127))
    error.throw()  # the largest valid id passes


def test_out_of_range_position_raises_in_checked_mode() -> None:
    model = Transformer(TransformerConfig.gpt2_tiny(), key=jax.random.key(0))
    tokens = jnp.zeros((1, 4), jnp.int32)
    positions = jnp.array([[61, 62, 63, 64]], jnp.int32)
    error, _ = jax.jit(checkify.checkify(lambda p: model(tokens, positions=p, check_ids=True)[0]))(positions)
    with pytest.raises(checkify.JaxRuntimeError, match=r"positions\[0, 3\] = 64 is outside \[0, max_seq_len=64\)"):
        error.throw()


def test_unchecked_forward_is_unchanged_and_has_no_check_ops() -> None:
    model = Transformer(TransformerConfig.gpt2_tiny(), key=jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 128)
    unchecked = str(jax.make_jaxpr(lambda t: model(t, check_ids=False)[0])(tokens))
    assert unchecked == str(jax.make_jaxpr(lambda t: model(t)[0])(tokens))
    assert re.search(r"\bcheck\[", unchecked) is None
    assert re.search(r"\bcheck\[", str(jax.make_jaxpr(lambda t: model(t, check_ids=True)[0])(tokens)))
    # The checked mode computes the same logits; the unchecked one keeps the plain lookup's semantics.
    error, checked = jax.jit(checkify.checkify(lambda t: model(t, check_ids=True)[0]))(tokens)
    error.throw()
    logits, _ = jax.jit(model.__call__)(tokens)
    np.testing.assert_array_equal(np.asarray(checked), np.asarray(logits))
    wrapped, _ = model(tokens.at[0, 2].set(-1))
    last, _ = model(tokens.at[0, 2].set(127))
    np.testing.assert_array_equal(np.asarray(wrapped), np.asarray(last))
    assert bool(jnp.all(jnp.isnan(model(tokens.at[0, 2].set(128))[0][0, 2:])))
