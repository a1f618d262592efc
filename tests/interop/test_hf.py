"""Hugging Face checkpoints: tiny random GPT-2, Llama, Qwen2 and Mistral models saved by transformers,
loaded into xax (fp32 logits within 1e-4), exported back and reloaded by transformers."""

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xax.arch.transformer import Transformer
from xax.core.errors import ConfigError
from xax.interop import StateDictError, config_from_hf, load_hf, read_hf_weights, save_hf
from xax.testing import assert_parity

NEEDS_TORCH = "needs the torch extra (torch, transformers), which `make install` adds on Python 3.11 only"
torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
transformers = pytest.importorskip("transformers", reason=NEEDS_TORCH)

RTOL, ATOL = 1e-4, 1e-4
# Random weights of this scale give logits with a spread comparable to a trained model's.
WEIGHT_STD = 0.2
VOCAB = 96
# Longer than Mistral's window below, so the window is exercised.
SEQ = 12

_ROPE_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

MODELS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "gpt2": (
        transformers.GPT2LMHeadModel,
        transformers.GPT2Config,
        {"vocab_size": VOCAB, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "bos_token_id": 0},
    ),
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, _ROPE_COMMON),
    "llama3_rope": (
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig,
        {**_ROPE_COMMON, "rope_parameters": _LLAMA3_ROPE, "attention_bias": True, "mlp_bias": True},
    ),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, {**_ROPE_COMMON, "tie_word_embeddings": True}),
    "mistral": (
        transformers.MistralForCausalLM,
        transformers.MistralConfig,
        {**_ROPE_COMMON, "num_key_value_heads": 1, "sliding_window": 5},
    ),
}
MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "llama3_rope": "llama", "qwen2": "qwen2", "mistral": "mistral"}


def _hf_model(name: str, **changes: Any) -> Any:
    model_cls, config_cls, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**kwargs, **changes})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, WEIGHT_STD)
    return model


def _tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (2, SEQ))


def _assert_logits_match(model: Transformer, hf: Any) -> None:
    logits = jax.jit(lambda m, t: m(t.astype(jnp.int32))[0])
    assert_parity(lambda t: logits(model, t), lambda t: hf(t).logits, [_tokens()], rtol=RTOL, atol=ATOL)


def _hf_logits(hf: Any) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(_tokens())).logits.numpy()


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpoints_load_and_export_with_the_logits_of_transformers(name: str, tmp_path: Path) -> None:
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf", overrides={"scan_layers": True})
    assert model.config.scan_layers
    _assert_logits_match(model, hf)

    save_hf(model, tmp_path / "xax", model_type=MODEL_TYPES[name])
    reloaded = type(hf).from_pretrained(tmp_path / "xax").eval()
    np.testing.assert_array_equal(_hf_logits(reloaded), _hf_logits(hf))
    original, exported = hf.state_dict(), reloaded.state_dict()
    assert exported.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(exported[key], value), key


def test_unscanned_layers_load_as_a_tuple(tmp_path: Path) -> None:
    hf = _hf_model("qwen2")
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    assert isinstance(model.layers, tuple) and len(model.layers) == 2
    _assert_logits_match(model, hf)


def test_gpt2_ties_its_head_to_the_token_embedding(tmp_path: Path) -> None:
    hf = _hf_model("gpt2")
    hf.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in read_hf_weights(tmp_path / "tied")
    tied = load_hf(tmp_path / "tied")
    assert tied.lm_head is None
    np.testing.assert_array_equal(np.asarray(tied.unembedding()), hf.transformer.wte.weight.detach().numpy())

    untied_hf = _hf_model("gpt2", tie_word_embeddings=False)
    untied_hf.save_pretrained(tmp_path / "untied")
    untied = load_hf(tmp_path / "untied")
    assert untied.lm_head is not None
    _assert_logits_match(untied, untied_hf)


def test_sharded_checkpoints_load_and_save(tmp_path: Path) -> None:
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = load_hf(tmp_path / "hf")
    _assert_logits_match(model, hf)
    save_hf(model, tmp_path / "xax", model_type="llama", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "xax" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "xax").eval()
    np.testing.assert_array_equal(_hf_logits(reloaded), _hf_logits(hf))


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def test_an_unknown_config_field_is_named(tmp_path: Path) -> None:
    _hf_model("llama").save_pretrained(tmp_path)
    _edit_config(tmp_path, attn_logit_softcapping=50.0)
    with pytest.raises(ConfigError, match=r"fields \['attn_logit_softcapping'\] of model_type 'llama' are not handled"):
        load_hf(tmp_path)


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        ("llama", {"attention_bias": True}, "attention_bias=True with mlp_bias=False is not supported"),
        ("llama", {"hidden_act": "gelu_fast"}, "activation 'gelu_fast' is not supported"),
        ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, "uses one attention kind in all layers"),
        ("llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type='longrope' is unknown"),
        ("llama", {"model_type": "gemma"}, "model_type='gemma' is not supported"),
    ],
)
def test_unsupported_config_values_are_named(name: str, changes: dict, message: str, tmp_path: Path) -> None:
    _hf_model(name).save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message):
        load_hf(tmp_path)


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "mistral"])
def test_absent_fields_take_the_defaults_of_transformers(name: str) -> None:
    hf = MODELS[name][1]()
    config = config_from_hf({"model_type": hf.model_type})
    assert config.vocab_size == hf.vocab_size
    assert config.d_model == (hf.n_embd if name == "gpt2" else hf.hidden_size)
    assert config.num_layers == hf.num_hidden_layers
    assert config.num_heads == hf.num_attention_heads
    assert config.max_seq_len == hf.max_position_embeddings
    assert config.tie_embeddings == hf.tie_word_embeddings
    if name != "gpt2":
        assert config.hidden_dim == hf.intermediate_size
        assert config.kv_heads == hf.num_key_value_heads
        assert config.norm_eps == hf.rms_norm_eps
        assert config.rope_theta == hf.rope_parameters["rope_theta"]
        assert config.sliding_window == (None if name == "llama" else hf.sliding_window)


def test_weights_outside_the_table_are_named(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    _hf_model("llama").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    extra = {**weights, "model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}
    save_file(extra, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StateDictError, match=r"keys 'model\.layers\.0\.self_attn\.q_norm\.weight' match no row"):
        load_hf(tmp_path)
    del weights["model.layers.1.mlp.gate_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StateDictError, match=r"'layers\.1\.mlp\.gate_proj\.weight' are filled by no state_dict key"):
        load_hf(tmp_path)


def test_pickled_checkpoints_are_refused(tmp_path: Path) -> None:
    _hf_model("gpt2").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(StateDictError, match=r"\['pytorch_model\.bin'\] are pickles, never read"):
        load_hf(tmp_path)


def test_export_refuses_a_config_the_family_cannot_express(tmp_path: Path) -> None:
    _hf_model("llama").save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"TransformerConfig.positions='rope' cannot be saved as 'gpt2'"):
        save_hf(model, tmp_path / "out", model_type="gpt2")
    with pytest.raises(ConfigError, match=r"overrides \['d_model'\] are fixed by the checkpoint"):
        load_hf(tmp_path / "hf", overrides={"d_model": 64})


def test_runtime_overrides_keep_float32_parameters(tmp_path: Path) -> None:
    _hf_model("llama").save_pretrained(tmp_path)
    model = load_hf(tmp_path, overrides={"compute_dtype": "bfloat16", "remat": "full"})
    assert (model.config.compute_dtype, model.config.remat) == ("bfloat16", "full")
    assert model.embed_tokens.weight.dtype == jnp.float32


def test_base_model_checkpoints_load_without_the_prefix(tmp_path: Path) -> None:
    # The hub's GPT-2 is saved from GPT2Model: "h.0.attn.c_attn.weight", not "transformer.h.0...".
    hf = _hf_model("gpt2")
    hf.transformer.save_pretrained(tmp_path)
    assert "wte.weight" in read_hf_weights(tmp_path)
    _assert_logits_match(load_hf(tmp_path), hf)
