"""MLP and SwiGLU against transformers' GPT-2 and Llama feed-forward blocks."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xax.nn.mlp import MLP, SwiGLU, get_activation

NEEDS_TORCH = "needs the torch extra (torch, transformers), which `make install` adds on Python 3.11 only"
torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
transformers = pytest.importorskip("transformers", reason=NEEDS_TORCH)


def _set(layer: Any, weight: Any, bias: Any = None) -> Any:
    layer = eqx.tree_at(lambda lin: lin.weight, layer, jnp.asarray(weight.detach().numpy()))
    if bias is not None:
        layer = eqx.tree_at(lambda lin: lin.bias, layer, jnp.asarray(bias.detach().numpy()))
    return layer


def test_gelu_mlp_matches_gpt2_mlp() -> None:
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, resid_pdrop=0.0, activation_function="gelu_new")
    ref = GPT2MLP(64, config).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    mlp = MLP(16, 64, key=jax.random.key(0), activation="gelu_tanh")
    # GPT-2's Conv1D stores (in, out); eqx.nn.Linear stores (out, in).
    mlp = eqx.tree_at(lambda m: m.up_proj, mlp, _set(mlp.up_proj, ref.c_fc.weight.T, ref.c_fc.bias))
    mlp = eqx.tree_at(lambda m: m.down_proj, mlp, _set(mlp.down_proj, ref.c_proj.weight.T, ref.c_proj.bias))
    x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), expected, atol=1e-5)


def test_swiglu_matches_llama_mlp() -> None:
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=16, num_attention_heads=4, intermediate_size=40, hidden_act="silu", mlp_bias=False
    )
    ref = LlamaMLP(config).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    mlp = SwiGLU(16, 40, key=jax.random.key(0))
    mlp = eqx.tree_at(
        lambda m: (m.gate_proj, m.up_proj, m.down_proj),
        mlp,
        (
            _set(mlp.gate_proj, ref.gate_proj.weight),
            _set(mlp.up_proj, ref.up_proj.weight),
            _set(mlp.down_proj, ref.down_proj.weight),
        ),
    )
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), expected, atol=1e-5)


def test_activations_match_torch() -> None:
    x = np.linspace(-4, 4, 33, dtype=np.float32)
    xt = torch.from_numpy(x)
    expected = {
        "gelu": torch.nn.functional.gelu(xt),
        "gelu_tanh": torch.nn.functional.gelu(xt, approximate="tanh"),
        "silu": torch.nn.functional.silu(xt),
        "relu": torch.relu(xt),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(get_activation(name)(jnp.asarray(x))), value.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="activation='swish' is unknown"):
        get_activation("swish")
