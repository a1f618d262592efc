"""The Hugging Face families ``xax.interop.hf`` reads and writes: for GPT-2, Llama, Qwen2 and
Mistral, which ``config.json`` fields map to ``TransformerConfig`` (and back), which are irrelevant
to the weights and the forward pass, and the declared name table of each family's state dict."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from xax.arch.transformer import TransformerConfig
from xax.core.errors import ConfigError
from xax.interop.state_dict import (
    Chain,
    Rule,
    Split,
    Transpose,
)
from xax.nn.embeddings import RopeScaling

# Fields no family needs: they do not change the weights or the forward pass.
COMMON_IGNORED: dict[str, str] = {
    "model_type": "selects the family",
    "architectures": "names the torch class; model_type decides the layout",
    **dict.fromkeys(("dtype", "torch_dtype"), "the storage dtype; parameters load as float32"),
    **dict.fromkeys(("transformers_version", "_name_or_path"), "provenance"),
    **dict.fromkeys(
        ("bos_token_id", "eos_token_id", "pad_token_id", "tokenizer_class", "task_specific_params"),
        "a tokenizer or generation setting",
    ),
    **dict.fromkeys(
        ("use_cache", "output_attentions", "output_hidden_states", "return_dict"), "a switch of the torch API"
    ),
    "chunk_size_feed_forward": "trades memory for speed in torch; same result",
    **dict.fromkeys(("id2label", "label2id", "problem_type"), "settings of classification heads, absent here"),
}
_DROPOUT = "a training choice; set TransformerConfig.dropout through overrides"

# TransformerConfig fields a checkpoint does not fix, which load_hf's overrides may set.
RUNTIME_FIELDS = ("dropout", "attention_impl", "scan_layers", "remat", "compute_dtype")

_ACTIVATIONS_FROM_HF = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}
_ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "silu": "silu", "relu": "relu"}
_ROPE_FIELDS = {f.name for f in fields(RopeScaling)} - {"rope_type"}
# The RopeScaling fields each rope_type reads, the ones written to config.json.
_ROPE_TYPE_FIELDS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "yarn": (
        *("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"),
        *("attention_factor", "mscale", "mscale_all_dim", "truncate"),
    ),
}


class HfFields:
    """A ``config.json`` dict read through the family's handled keys, with Hugging Face's defaults."""

    def __init__(self, raw: Mapping[str, Any], defaults: Mapping[str, Any], model_type: str) -> None:
        self.raw, self.defaults, self.model_type = raw, defaults, model_type

    def __getitem__(self, key: str) -> Any:
        if key not in self.defaults:
            raise KeyError(f"{key!r} is not a handled field of {self.model_type}; add it to the family's defaults")
        return self.raw.get(key, self.defaults[key])

    def expect(self, key: str, supported: Any) -> None:
        """Raises unless the field has the one value the model supports."""
        if self[key] != supported:
            raise ConfigError(
                f"config.json: {key}={self[key]!r} ({self.model_type}) is not supported by xax's Transformer, "
                f"which implements {key}={supported!r} only"
            )


def _activation(hf_name: str) -> str:
    if hf_name not in _ACTIVATIONS_FROM_HF:
        raise ConfigError(
            f"config.json: activation {hf_name!r} is not supported; expected one of {_ACTIVATIONS_FROM_HF}"
        )
    return _ACTIVATIONS_FROM_HF[hf_name]


def _rope_from_hf(f: HfFields) -> tuple[float, RopeScaling | None]:
    """Reads ``rope_parameters`` (transformers 5) or the older ``rope_theta`` and ``rope_scaling``."""
    params = {**(f["rope_scaling"] or {}), **(f["rope_parameters"] or {})}
    theta = float(params.pop("rope_theta", f["rope_theta"] if f["rope_theta"] is not None else 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    unknown = sorted(set(params) - _ROPE_FIELDS)
    if unknown:
        raise ConfigError(
            f"config.json: rope_parameters fields {unknown} are not supported; known: {sorted(_ROPE_FIELDS)}"
        )
    if rope_type == "default":
        if params:
            raise ConfigError(f"config.json: rope_parameters {params} are set but rope_type is 'default'")
        return theta, None
    try:
        return theta, RopeScaling(rope_type=rope_type, **params)
    except ValueError as error:
        raise ConfigError(f"config.json: rope_parameters: {error}") from error


def _rope_to_hf(config: TransformerConfig) -> dict[str, Any]:
    scaling = config.rope_scaling
    params: dict[str, Any] = {"rope_type": "default" if scaling is None else scaling.rope_type}
    params["rope_theta"] = config.rope_theta
    if scaling is not None:
        used = _ROPE_TYPE_FIELDS[scaling.rope_type]
        params |= {k: getattr(scaling, k) for k in used if getattr(scaling, k) is not None}
    return params


def _require(config: TransformerConfig, model_type: str, **supported: Any) -> None:
    """Raises unless the config has the values the family can express."""
    for name, value in supported.items():
        if getattr(config, name) != value:
            raise ConfigError(
                f"TransformerConfig.{name}={getattr(config, name)!r} cannot be saved as {model_type!r}, "
                f"which needs {name}={value!r}; pick the family that matches the config"
            )


def _layer(config: TransformerConfig, path: str) -> str:
    """The Equinox path template of a per-layer leaf: stacked (scanned) or one block per tuple entry."""
    return f"layers.{path}[{{i}}]" if config.scan_layers else f"layers.{{i}}.{path}"


# GPT-2.

_GPT2_DEFAULTS: dict[str, Any] = {  # GPT2Config's defaults, for fields a config.json omits
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}
_GPT2_IGNORED = {
    "attn_pdrop": _DROPOUT,
    "embd_pdrop": _DROPOUT,
    "resid_pdrop": _DROPOUT,
    "n_ctx": "an older duplicate of n_positions",
    "reorder_and_upcast_attn": "fp16 numerics of torch's attention; xax computes softmax in float32",
    **dict.fromkeys(
        ("summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout"),
        "the multiple-choice head of GPT2DoubleHeadsModel",
    ),
}


def _gpt2_from_hf(f: HfFields) -> TransformerConfig:
    f.expect("scale_attn_weights", True)
    f.expect("scale_attn_by_inverse_layer_idx", False)
    f.expect("add_cross_attention", False)
    return TransformerConfig(
        vocab_size=f["vocab_size"],
        max_seq_len=f["n_positions"],
        d_model=f["n_embd"],
        num_layers=f["n_layer"],
        num_heads=f["n_head"],
        mlp_dim=f["n_inner"],
        positions="learned",
        norm="layernorm",
        norm_eps=f["layer_norm_epsilon"],
        mlp="mlp",
        activation=_activation(f["activation_function"]),
        qkv_bias=True,
        bias=True,
        tie_embeddings=f["tie_word_embeddings"],
        init_std=f["initializer_range"],
        scaled_residual_init=True,
    )


def _gpt2_to_hf(c: TransformerConfig) -> dict[str, Any]:
    _require(c, "gpt2", positions="learned", norm="layernorm", mlp="mlp", qkv_bias=True, bias=True)
    _require(c, "gpt2", kv_heads=c.num_heads, head_size=c.d_model // c.num_heads, sliding_window=None)
    return {
        "vocab_size": c.vocab_size,
        "n_positions": c.max_seq_len,
        "n_embd": c.d_model,
        "n_layer": c.num_layers,
        "n_head": c.num_heads,
        "n_inner": c.mlp_dim,
        "activation_function": "gelu_new" if c.activation == "gelu_tanh" else _ACTIVATIONS_TO_HF[c.activation],
        "layer_norm_epsilon": c.norm_eps,
        "initializer_range": c.init_std,
        "tie_word_embeddings": c.tie_embeddings,
        "attn_pdrop": 0.0,
        "embd_pdrop": c.dropout,
        "resid_pdrop": c.dropout,
    }


def _gpt2_table(c: TransformerConfig) -> list[Rule]:
    qkv = ("q_proj", "k_proj", "v_proj")
    rows = [
        Rule("transformer.wte.weight", "embed_tokens.weight"),
        Rule("transformer.wpe.weight", "embed_positions.weight"),
        Rule("transformer.ln_f.{p:weight|bias}", "norm.{p}"),
        Rule("transformer.h.{i}.ln_1.{p:weight|bias}", _layer(c, "input_layernorm.{p}")),
        Rule("transformer.h.{i}.ln_2.{p:weight|bias}", _layer(c, "post_attention_layernorm.{p}")),
        # Conv1D weights are (in, out); c_attn fuses q, k, v along the output axis.
        Rule(
            "transformer.h.{i}.attn.c_attn.weight",
            tuple(_layer(c, f"self_attn.{n}.weight") for n in qkv),
            Chain(Transpose(), Split(3, axis=0)),
        ),
        Rule("transformer.h.{i}.attn.c_attn.bias", tuple(_layer(c, f"self_attn.{n}.bias") for n in qkv), Split(3)),
        Rule("transformer.h.{i}.attn.c_proj.weight", _layer(c, "self_attn.o_proj.weight"), Transpose()),
        Rule("transformer.h.{i}.attn.c_proj.bias", _layer(c, "self_attn.o_proj.bias")),
        Rule("transformer.h.{i}.mlp.c_fc.weight", _layer(c, "mlp.up_proj.weight"), Transpose()),
        Rule("transformer.h.{i}.mlp.c_fc.bias", _layer(c, "mlp.up_proj.bias")),
        Rule("transformer.h.{i}.mlp.c_proj.weight", _layer(c, "mlp.down_proj.weight"), Transpose()),
        Rule("transformer.h.{i}.mlp.c_proj.bias", _layer(c, "mlp.down_proj.bias")),
        # Causal-mask buffers that older checkpoints store; the mask is built at call time.
        Rule("transformer.h.{i}.attn.{b:bias|masked_bias}", None),
    ]
    return [*rows, _lm_head(c)]


def _lm_head(c: TransformerConfig) -> Rule:
    # A tied head is the embedding: a stored copy is dropped, as transformers does when it ties.
    return Rule("lm_head.weight", None if c.tie_embeddings else "lm_head.weight")


# Llama, Qwen2, Mistral.

_ROPE_DEFAULTS: dict[str, Any] = {"rope_parameters": None, "rope_theta": None, "rope_scaling": None}
_LLAMA_DEFAULTS: dict[str, Any] = {  # LlamaConfig's defaults, for fields a config.json omits
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    **_ROPE_DEFAULTS,
}
_QWEN2_DEFAULTS: dict[str, Any] = {  # Qwen2Config's: no head_dim or bias fields, sliding window per layer
    **{k: v for k, v in _LLAMA_DEFAULTS.items() if k not in ("head_dim", "attention_bias", "mlp_bias")},
    "vocab_size": 151936,
    "intermediate_size": 22016,
    "max_position_embeddings": 32768,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
    "layer_types": None,
}
_MISTRAL_DEFAULTS: dict[str, Any] = {  # MistralConfig's: no bias fields, one window for every layer
    **{k: v for k, v in _LLAMA_DEFAULTS.items() if k not in ("attention_bias", "mlp_bias")},
    "intermediate_size": 14336,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "sliding_window": 4096,
}
_LLAMA_IGNORED = {
    "attention_dropout": _DROPOUT,
    "pretraining_tp": "slices the same matmuls for tensor-parallel pretraining; same result",
}


def _rope_model(
    f: HfFields, *, qkv_bias: bool, bias: bool, sliding_window: int | None, head_dim: int | None
) -> TransformerConfig:
    """The config shared by the Llama family: RoPE, RMSNorm, SwiGLU, optional GQA."""
    theta, scaling = _rope_from_hf(f)
    return TransformerConfig(
        vocab_size=f["vocab_size"],
        max_seq_len=f["max_position_embeddings"],
        d_model=f["hidden_size"],
        num_layers=f["num_hidden_layers"],
        num_heads=f["num_attention_heads"],
        num_kv_heads=f["num_key_value_heads"],
        head_dim=head_dim,
        mlp_dim=f["intermediate_size"],
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        norm="rmsnorm",
        norm_eps=f["rms_norm_eps"],
        mlp="swiglu",
        activation=_activation(f["hidden_act"]),
        qkv_bias=qkv_bias,
        bias=bias,
        tie_embeddings=f["tie_word_embeddings"],
        sliding_window=sliding_window,
        init_std=f["initializer_range"],
        scaled_residual_init=False,
    )


def _rope_model_to_hf(c: TransformerConfig) -> dict[str, Any]:
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.kv_heads,
        "hidden_act": _ACTIVATIONS_TO_HF[c.activation],
        "max_position_embeddings": c.max_seq_len,
        "initializer_range": c.init_std,
        "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "rope_parameters": _rope_to_hf(c),
        "attention_dropout": 0.0,
    }


def _llama_from_hf(f: HfFields) -> TransformerConfig:
    if f["attention_bias"] != f["mlp_bias"]:
        raise ConfigError(
            f"config.json: attention_bias={f['attention_bias']} with mlp_bias={f['mlp_bias']} is not supported; "
            "xax's Transformer gives o_proj and the MLP biases together (TransformerConfig.bias)"
        )
    bias = f["attention_bias"]
    return _rope_model(f, qkv_bias=bias, bias=bias, sliding_window=None, head_dim=f["head_dim"])


def _llama_to_hf(c: TransformerConfig) -> dict[str, Any]:
    _require(c, "llama", positions="rope", norm="rmsnorm", mlp="swiglu", sliding_window=None, bias=c.qkv_bias)
    return {**_rope_model_to_hf(c), "head_dim": c.head_size, "attention_bias": c.bias, "mlp_bias": c.bias}


def _qwen2_sliding_window(f: HfFields) -> int | None:
    """One window for all layers, or none; Qwen2 can mix both, which the model cannot."""
    window = f["sliding_window"] if f["use_sliding_window"] else None
    layer_types = f["layer_types"] or [
        "sliding_attention" if window is not None and i >= f["max_window_layers"] else "full_attention"
        for i in range(f["num_hidden_layers"])
    ]
    if set(layer_types) == {"full_attention"}:
        return None
    if set(layer_types) == {"sliding_attention"} and window is not None:
        return window
    raise ConfigError(
        f"config.json: layer_types={layer_types} (use_sliding_window={f['use_sliding_window']}, "
        f"sliding_window={f['sliding_window']}) is not supported; xax's Transformer uses one attention kind "
        "in all layers"
    )


def _qwen2_from_hf(f: HfFields) -> TransformerConfig:
    return _rope_model(f, qkv_bias=True, bias=False, sliding_window=_qwen2_sliding_window(f), head_dim=None)


def _qwen2_to_hf(c: TransformerConfig) -> dict[str, Any]:
    _require(c, "qwen2", positions="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=True, bias=False)
    _require(c, "qwen2", head_size=c.d_model // c.num_heads)
    window = c.sliding_window
    return {
        **_rope_model_to_hf(c),
        "use_sliding_window": window is not None,
        "sliding_window": window,
        "max_window_layers": 0 if window is not None else c.num_layers,
        "layer_types": [("full" if window is None else "sliding") + "_attention"] * c.num_layers,
    }


def _mistral_from_hf(f: HfFields) -> TransformerConfig:
    return _rope_model(f, qkv_bias=False, bias=False, sliding_window=f["sliding_window"], head_dim=f["head_dim"])


def _mistral_to_hf(c: TransformerConfig) -> dict[str, Any]:
    _require(c, "mistral", positions="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False, bias=False)
    return {**_rope_model_to_hf(c), "head_dim": c.head_size, "sliding_window": c.sliding_window}


def _llama_table(c: TransformerConfig) -> list[Rule]:
    rows = [
        Rule("model.embed_tokens.weight", "embed_tokens.weight"),
        Rule("model.norm.weight", "norm.weight"),
        Rule("model.layers.{i}.{n:input_layernorm|post_attention_layernorm}.weight", _layer(c, "{n}.weight")),
        Rule("model.layers.{i}.self_attn.{p:q|k|v|o}_proj.weight", _layer(c, "self_attn.{p}_proj.weight")),
        Rule("model.layers.{i}.mlp.{p:gate|up|down}_proj.weight", _layer(c, "mlp.{p}_proj.weight")),
        # RoPE frequencies that older checkpoints store; they are computed from the config.
        Rule("model.layers.{i}.self_attn.rotary_emb.inv_freq", None),
    ]
    if c.qkv_bias:
        rows.append(Rule("model.layers.{i}.self_attn.{p:q|k|v}_proj.bias", _layer(c, "self_attn.{p}_proj.bias")))
    if c.bias:
        rows.append(Rule("model.layers.{i}.self_attn.o_proj.bias", _layer(c, "self_attn.o_proj.bias")))
        rows.append(Rule("model.layers.{i}.mlp.{p:gate|up|down}_proj.bias", _layer(c, "mlp.{p}_proj.bias")))
    return [*rows, _lm_head(c)]


@dataclass(frozen=True)
class _Family:
    """How one ``model_type`` maps: its class, config fields (with defaults), table and base prefix."""

    architecture: str
    defaults: Mapping[str, Any]
    ignored: Mapping[str, str]
    from_hf: Callable[[HfFields], TransformerConfig]
    to_hf: Callable[[TransformerConfig], dict[str, Any]]
    table: Callable[[TransformerConfig], list[Rule]]
    prefix: str


FAMILIES: dict[str, _Family] = {
    "gpt2": _Family(
        "GPT2LMHeadModel", _GPT2_DEFAULTS, _GPT2_IGNORED, _gpt2_from_hf, _gpt2_to_hf, _gpt2_table, "transformer."
    ),
    "llama": _Family(
        "LlamaForCausalLM", _LLAMA_DEFAULTS, _LLAMA_IGNORED, _llama_from_hf, _llama_to_hf, _llama_table, "model."
    ),
    "qwen2": _Family(
        "Qwen2ForCausalLM", _QWEN2_DEFAULTS, _LLAMA_IGNORED, _qwen2_from_hf, _qwen2_to_hf, _llama_table, "model."
    ),
    "mistral": _Family(
        "MistralForCausalLM",
        _MISTRAL_DEFAULTS,
        _LLAMA_IGNORED,
        _mistral_from_hf,
        _mistral_to_hf,
        _llama_table,
        "model.",
    ),
}


def family_of(model_type: Any) -> _Family:
    if model_type not in FAMILIES:
        raise ConfigError(
            f"config.json: model_type={model_type!r} is not supported; expected one of {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]
