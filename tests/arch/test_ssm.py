"""The SSM language model: recurrent decoding equals the parallel forward, Mamba parity with transformers.

Tolerance: float32 results are compared at a max abs error of 1e-5 times the logit scale (at
least 1); see tests/nn/test_ssm.py for why that bounds float32 rounding over these short sequences.
"""

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from xax.arch.ssm import SSMConfig, SSMLanguageModel
from xax.core.errors import ConfigError
from xax.nn.ssm import DiagonalSSM, SelectiveSSM

NEEDS_TORCH = "needs the torch extra (torch, transformers), which `make install` adds on Python 3.11 only"

TOL = 1e-5
BATCH, SEQ, VOCAB = 2, 9, 13

CONFIGS = {
    "selective": SSMConfig(vocab_size=VOCAB, d_model=8, num_layers=2, layer="selective", d_state=4),
    "diagonal-mlp-untied": SSMConfig(
        vocab_size=VOCAB, d_model=8, num_layers=2, layer="diagonal", d_state=4, mlp_ratio=2, tie_embeddings=False
    ),
    "diagonal-real": SSMConfig(
        vocab_size=VOCAB, d_model=8, num_layers=2, layer="diagonal", d_state=3, diagonal_init="real"
    ),
}


def assert_close(actual: jax.Array, expected: jax.Array | np.ndarray) -> None:
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.max(np.abs(expected))))
    err = float(np.max(np.abs(np.asarray(actual, np.float64) - expected)))
    assert err <= TOL * scale, f"max abs error {err:.3g} > {TOL * scale:.3g}"


def tokens(key: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(key), (BATCH, SEQ), 0, VOCAB)


def decode_all(model: SSMLanguageModel, toks: jax.Array, cache: tuple) -> jax.Array:
    step = eqx.filter_jit(SSMLanguageModel.decode_step)
    logits = []
    for t in range(toks.shape[1]):
        lg, cache = step(model, toks[:, t], cache)
        logits.append(lg)
    return jnp.stack(logits, axis=1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_recurrent_decode_equals_parallel_forward(name: str) -> None:
    config = CONFIGS[name]
    model = SSMLanguageModel(config, key=jax.random.key(0))
    layer_type = SelectiveSSM if config.layer == "selective" else DiagonalSSM
    assert all(isinstance(b.ssm, layer_type) for b in model.blocks)
    toks = tokens()
    full = eqx.filter_jit(SSMLanguageModel.__call__)(model, toks)
    assert full.shape == (BATCH, SEQ, VOCAB)
    assert full.dtype == jnp.float32
    assert_close(decode_all(model, toks, model.init_cache(BATCH)), full)

    # A prompt consumed in parallel, then decoding continued from its state.
    prefix, cache = eqx.filter_jit(SSMLanguageModel.prefill)(model, toks[:, :4], model.init_cache(BATCH))
    assert_close(jnp.concatenate([prefix, decode_all(model, toks[:, 4:], cache)], axis=1), full)


@pytest.mark.parametrize("name", ["diagonal-mlp-untied"])
def test_gradients_finite_and_bfloat16_policy(name: str) -> None:
    config = CONFIGS[name]
    model32 = SSMLanguageModel(config, key=jax.random.key(0))
    model16 = SSMLanguageModel(
        dataclasses.replace(config, compute_dtype="bfloat16"),
        key=jax.random.key(0),
    )
    toks = tokens()

    def loss(model: SSMLanguageModel, toks: jax.Array) -> jax.Array:
        logits = model(toks[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1))

    value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    loss32, grads32 = value_and_grad(model32, toks)
    loss16, grads16 = value_and_grad(model16, toks)
    # At initialization the loss is near log(vocab); bfloat16 activations move it by rounding only.
    assert abs(float(loss32) - np.log(VOCAB)) < 0.5
    assert abs(float(loss16) - float(loss32)) < 1e-2
    for grads in (grads32, grads16):
        leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_array))
        assert all(leaf.dtype == jnp.float32 for leaf in leaves)
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)
    # Parameters stay float32 under bfloat16 compute; logits come out float32.
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(eqx.filter(model16, eqx.is_array)))
    logits16 = eqx.filter_jit(SSMLanguageModel.__call__)(model16, toks)
    assert logits16.dtype == jnp.float32
    # The gradient reaches every parameter: the embedding, every block and the final norm.
    nonzero = [float(jnp.max(jnp.abs(leaf))) > 0 for leaf in jax.tree.leaves(eqx.filter(grads32, eqx.is_array))]
    assert all(nonzero), nonzero


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"SSMConfig\.layer='attention'.*\['diagonal', 'selective'\]"):
        SSMConfig(layer="attention")
    with pytest.raises(ConfigError, match=r"SSMConfig\.compute_dtype='float16'"):
        SSMConfig(compute_dtype="float16")
    with pytest.raises(ConfigError, match=r"SSMConfig\.d_state=3 must be even"):
        SSMConfig(layer="diagonal", d_state=3)
    with pytest.raises(ConfigError, match=r"SSMConfig\.mlp_ratio=-1"):
        SSMConfig(mlp_ratio=-1)


# Our parameter path inside a block -> the transformers name inside backbone.layers.{i}.
_HF_BLOCK_KEYS = [
    ("norm.weight", "norm.weight"),
    ("ssm.w_in", "mixer.in_proj.weight"),
    ("ssm.conv_w", "mixer.conv1d.weight"),
    ("ssm.conv_b", "mixer.conv1d.bias"),
    ("ssm.w_x", "mixer.x_proj.weight"),
    ("ssm.w_dt", "mixer.dt_proj.weight"),
    ("ssm.b_dt", "mixer.dt_proj.bias"),
    ("ssm.a_log", "mixer.A_log"),
    ("ssm.d", "mixer.D"),
    ("ssm.w_out", "mixer.out_proj.weight"),
]


def _load_hf_mamba(model: SSMLanguageModel, state_dict: dict[str, np.ndarray]) -> SSMLanguageModel:
    """Copies a transformers MambaForCausalLM state dict (tied embeddings) into an SSMLanguageModel."""
    table: list[tuple[Callable[[SSMLanguageModel], jax.Array], str]] = [
        (lambda m: m.embed.weight, "backbone.embeddings.weight"),
        (lambda m: m.norm.weight, "backbone.norm_f.weight"),
    ]
    for i in range(len(model.blocks)):
        for ours, theirs in _HF_BLOCK_KEYS:
            table.append((lambda m, i=i, ours=ours: _get(m.blocks[i], ours), f"backbone.layers.{i}.{theirs}"))
    # Conv1d weights are (E, 1, K) in torch; everything else has our shape.
    values = [jnp.asarray(state_dict[name].reshape(get(model).shape)) for get, name in table]
    return eqx.tree_at(lambda m: [get(m) for get, _ in table], model, values)


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def test_selective_model_matches_transformers_mamba() -> None:
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    transformers = pytest.importorskip("transformers", reason=NEEDS_TORCH)
    torch.manual_seed(0)
    hf_config = transformers.MambaConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        state_size=4,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
    )
    hf = transformers.MambaForCausalLM(hf_config).eval()
    with torch.no_grad():
        # Move the norm weights and D off their initial ones, so a mapping error in them shows.
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", "mixer.D")):
                p.add_(0.3 * torch.randn_like(p))
    toks = tokens()
    with torch.no_grad():
        expected = hf(torch.tensor(np.array(toks), dtype=torch.long), use_cache=False).logits.numpy()

    state_dict = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    config = SSMConfig(vocab_size=VOCAB, d_model=8, num_layers=2, layer="selective", d_state=4, d_conv=4, expand=2)
    model = _load_hf_mamba(SSMLanguageModel(config, key=jax.random.key(0)), state_dict)
    layer = model.blocks[0].ssm
    assert isinstance(layer, SelectiveSSM)
    assert layer.dt_rank == hf_config.time_step_rank
    assert_close(eqx.filter_jit(SSMLanguageModel.__call__)(model, toks), expected)
    assert_close(decode_all(model, toks, model.init_cache(BATCH)), expected)


@pytest.mark.parametrize("bad", [VOCAB, -1])
def test_out_of_range_token_id_raises_in_checked_mode(bad: int) -> None:
    model = SSMLanguageModel(CONFIGS["selective"], key=jax.random.key(0))
    toks = tokens().at[1, 3].set(bad)
    message = rf"tokens\[1, 3\] = {bad} is outside \[0, vocab_size={VOCAB}\)"
    error, _ = jax.jit(checkify.checkify(lambda t: model(t, check_ids=True)))(toks)
    with pytest.raises(checkify.JaxRuntimeError, match=message):
        error.throw()
    with pytest.raises(checkify.JaxRuntimeError, match=message):
        model(toks, check_ids=True)  # an eager call raises at once
    step = jax.jit(checkify.checkify(lambda t, c: model.decode_step(t, c, check_ids=True)))
    error, _ = step(toks[:, 3], model.init_cache(BATCH))
    with pytest.raises(checkify.JaxRuntimeError, match=rf"tokens\[1\] = {bad} is outside \[0, vocab_size={VOCAB}\)"):
        error.throw()
    error, _ = step(toks[:, 2], model.init_cache(BATCH))
    error.throw()  # valid ids pass


def test_unchecked_forward_is_unchanged_and_has_no_check_ops() -> None:
    model = SSMLanguageModel(CONFIGS["selective"], key=jax.random.key(0))
    toks = tokens()
    unchecked = str(jax.make_jaxpr(lambda t: model(t, check_ids=False))(toks))
    assert unchecked == str(jax.make_jaxpr(model)(toks))
    assert re.search(r"\bcheck\[", unchecked) is None
    assert re.search(r"\bcheck\[", str(jax.make_jaxpr(lambda t: model(t, check_ids=True))(toks)))
    error, checked = jax.jit(checkify.checkify(lambda t: model(t, check_ids=True)))(toks)
    error.throw()
    assert_close(checked, eqx.filter_jit(model)(toks))
    # Unchecked ids keep the plain lookup's semantics: -1 reads the last row, VOCAB a row of NaN.
    np.testing.assert_array_equal(
        np.asarray(model(toks.at[0, 2].set(-1))), np.asarray(model(toks.at[0, 2].set(VOCAB - 1)))
    )
    assert bool(jnp.all(jnp.isnan(model(toks.at[0, 2].set(VOCAB))[0, 2:])))
