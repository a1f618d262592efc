"""The PyTorch models of the throughput benchmarks are xax's models: the same parameter counts at the
benchmarked sizes and, with xax's weights copied over through a declared name table, the same GPT-2
logits and loss and the same DiT outputs, at 1e-4 in float32 (tiny sizes, CPU)."""

from typing import TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

NEEDS_TORCH = "needs the torch extra (torch, transformers), which `make install` adds on Python 3.11 only"
torch = pytest.importorskip("torch", reason=NEEDS_TORCH)

from benchmarks.gpt2_throughput import LOSSES, gpt2_loss  # noqa: E402
from benchmarks.torch_models import GPT, DiT, DiTShape, GPTShape, count_parameters  # noqa: E402
from xax.arch.dit import DiT as XaxDiT  # noqa: E402
from xax.arch.dit import DiTConfig, dit_config  # noqa: E402
from xax.arch.transformer import Transformer, TransformerConfig  # noqa: E402
from xax.arch.unet import count_params  # noqa: E402
from xax.interop import Reshape, Rule, Split, to_state_dict  # noqa: E402
from xax.testing import assert_parity  # noqa: E402

RTOL, ATOL = 1e-4, 1e-4
# Noise of this scale on the weights gives outputs with a spread comparable to a trained model's.
WEIGHT_STD = 0.2

M = TypeVar("M")

# nanoGPT's names (torch.nn.Linear, (out, in) like xax, so no transposes) against xax's scanned layers.
GPT_TABLE = [
    Rule("transformer.wte.weight", "embed_tokens.weight"),
    Rule("transformer.wpe.weight", "embed_positions.weight"),
    Rule("transformer.ln_f.{p:weight|bias}", "norm.{p}"),
    Rule("transformer.h.{i}.ln_1.{p:weight|bias}", "layers.input_layernorm.{p}[{i}]"),
    Rule("transformer.h.{i}.ln_2.{p:weight|bias}", "layers.post_attention_layernorm.{p}[{i}]"),
    # c_attn fuses q, k and v along the output axis.
    Rule(
        "transformer.h.{i}.attn.c_attn.{p:weight|bias}",
        tuple(f"layers.self_attn.{name}_proj.{{p}}[{{i}}]" for name in "qkv"),
        Split(3),
    ),
    Rule("transformer.h.{i}.attn.c_proj.{p:weight|bias}", "layers.self_attn.o_proj.{p}[{i}]"),
    Rule("transformer.h.{i}.mlp.c_fc.{p:weight|bias}", "layers.mlp.up_proj.{p}[{i}]"),
    Rule("transformer.h.{i}.mlp.c_proj.{p:weight|bias}", "layers.mlp.down_proj.{p}[{i}]"),
]


def dit_table(config: DiTConfig) -> list[Rule]:
    """The benchmark DiT's names against xax's (stacked blocks); Equinox keeps a conv bias as (D, 1, 1)."""
    dim = config.d_model
    return [
        Rule("patch_embed.weight", "patch_embed.weight"),
        Rule("patch_embed.bias", "patch_embed.bias", Reshape((dim,), (dim, 1, 1))),
        Rule("time_embed.{l:linear1|linear2}.{p:weight|bias}", "time_embed.{l}.{p}"),
        Rule("class_embed.weight", "class_embed.weight"),
        Rule("blocks.{i}.{l:modulation|qkv|proj}.{p:weight|bias}", "blocks.{l}.{p}[{i}]"),
        Rule("blocks.{i}.mlp.fc1.{p:weight|bias}", "blocks.mlp.up_proj.{p}[{i}]"),
        Rule("blocks.{i}.mlp.fc2.{p:weight|bias}", "blocks.mlp.down_proj.{p}[{i}]"),
        Rule("final.{l:modulation|linear}.{p:weight|bias}", "final.{l}.{p}"),
    ]


def randomized(model: M, seed: int) -> M:
    """Gaussian noise added to every float leaf, so zero biases and zero-initialized modulations are
    active while norm scales stay near one."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(model)
    new = [
        x + jnp.asarray(WEIGHT_STD * rng.standard_normal(x.shape), x.dtype) if eqx.is_inexact_array(x) else x
        for x in leaves
    ]
    return jax.tree.unflatten(treedef, new)


def gpt_shape(config: TransformerConfig) -> GPTShape:
    return GPTShape(
        config.vocab_size, config.max_seq_len, config.d_model, config.num_layers, config.num_heads, config.norm_eps
    )


def dit_shape(config: DiTConfig) -> DiTShape:
    return DiTShape(
        config.input_size,
        config.patch_size,
        config.in_channels,
        config.d_model,
        config.num_layers,
        config.num_heads,
        config.mlp_ratio,
        config.num_classes or 1,
        config.frequency_dim,
    )


def tiny_dit_config() -> DiTConfig:
    return dit_config(
        "DiT-S/2", input_size=8, in_channels=4, d_model=32, num_layers=2, num_heads=2, num_classes=10, frequency_dim=16
    )


def load_into(module: torch.nn.Module, state_dict: dict[str, np.ndarray]) -> None:
    """Loads every tensor of ``module`` (strictly) from numpy arrays."""
    module.load_state_dict({name: torch.from_numpy(value.copy()) for name, value in state_dict.items()}, strict=True)


@pytest.mark.parametrize(
    ("name", "config"),
    [("gpt2_small", TransformerConfig.gpt2_small()), ("gpt2_tiny", TransformerConfig.gpt2_tiny())],
)
def test_gpt_parameter_count_matches_xax(name: str, config: TransformerConfig) -> None:
    expected = count_params(eqx.filter_eval_shape(Transformer, config, key=jax.random.key(0)))
    with torch.device("meta"):
        model = GPT(gpt_shape(config))
    assert count_parameters(model) == expected
    if name == "gpt2_small":
        assert expected == 124_439_808  # GPT-2 small with its tied 50257 x 768 embedding


@pytest.mark.parametrize("name", ["DiT-B/2", "DiT-S/2"])
def test_dit_parameter_count_matches_xax(name: str) -> None:
    config = dit_config(name)
    expected = count_params(eqx.filter_eval_shape(XaxDiT, config, key=jax.random.key(0)))
    with torch.device("meta"):
        model = DiT(dit_shape(config))
    assert count_parameters(model) == expected


def gpt_pair() -> tuple[Transformer, torch.nn.Module]:
    # GPT_TABLE names the stacked (scanned) layout's weights.
    config = TransformerConfig.gpt2_tiny().with_updates(scan_layers=True)
    model = randomized(Transformer(config, key=jax.random.key(0)), seed=1)
    reference = GPT(gpt_shape(config))
    state_dict = to_state_dict(model, GPT_TABLE)
    # The tied output projection is the token embedding, one tensor under two names.
    state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
    load_into(reference, state_dict)
    return model, reference.eval()


def test_gpt_logits_match_xax() -> None:
    model, reference = gpt_pair()
    tokens = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 16), dtype=np.int32)
    assert_parity(lambda t: model(t)[0], lambda t: reference(t.long()), [tokens], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("loss", LOSSES)
def test_gpt_loss_matches_xax(loss: str) -> None:
    model, reference = gpt_pair()
    windows = np.random.default_rng(3).integers(0, model.config.vocab_size, (2, 17), dtype=np.int32)
    assert_parity(
        lambda w: gpt2_loss(model, w, loss), lambda w: reference.loss(w.long()), [windows], rtol=RTOL, atol=ATOL
    )


def test_dit_outputs_match_xax() -> None:
    config = tiny_dit_config()
    model = randomized(XaxDiT(config, key=jax.random.key(0)), seed=4)
    reference = DiT(dit_shape(config))
    load_into(reference, to_state_dict(model, dit_table(config)))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, config.in_channels, config.input_size, config.input_size)).astype(np.float32)
    t = rng.uniform(0.0, 1.0, 3).astype(np.float32)
    y = np.array([0, 7, config.num_classes or 0], dtype=np.int32)  # the last is the null label
    assert_parity(
        lambda x, t, y: jax.vmap(model)(x, t, y),
        lambda x, t, y: reference.eval()(x, t, y.long()),
        [x, t, y],
        rtol=RTOL,
        atol=ATOL,
    )
