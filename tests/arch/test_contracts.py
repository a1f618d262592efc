"""The contract battery applied to every model family at tiny sizes: each transformer preset, the SSM
language models, DiT, UNet, the mmDiT and the VAE (their cases are in ``contract_cases``)."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

from tests.arch.contract_cases import denoiser_cases, ssm_cases, vae_cases
from tests.arch.contracts import CHECKS, ContractCase, Equivalence
from xax.arch.transformer import Transformer, TransformerConfig
from xax.nn.losses import chunked_cross_entropy, cross_entropy

BATCH, SEQ = 2, 8


def _tokens(config: TransformerConfig) -> Callable[[jax.Array], tuple]:
    return lambda key: (jax.random.randint(key, (BATCH, SEQ), 0, config.vocab_size),)


def _logits(model: Transformer, inputs: tuple) -> jax.Array:
    return model(inputs[0])[0]


def _next_token_loss(model: Transformer, inputs: tuple) -> jax.Array:
    (tokens,) = inputs
    logits, _ = model(tokens[:, :-1])
    return cross_entropy(logits, tokens[:, 1:])


def _cached_logits(model: Transformer, tokens: jax.Array, prefill: int) -> jax.Array:
    """Prefills ``prefill`` tokens, then feeds the rest one at a time."""
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    logits, cache = eqx.filter_jit(model.__call__)(tokens[:, :prefill], cache=cache)
    steps = [logits]
    step = eqx.filter_jit(lambda m, t, c: m(t, cache=c))
    for i in range(prefill, tokens.shape[1]):
        logits, cache = step(model, tokens[:, i : i + 1], cache)
        steps.append(logits)
    return jnp.concatenate(steps, axis=1)


def _transformer_equivalences(config: TransformerConfig, extended: bool) -> Callable[[], list[Equivalence]]:
    """Scan vs loop and cache vs full for every preset; remat and the chunked loss (independent of
    the attention/MLP style) only for the ``extended`` presets, to keep compile time down."""

    def build() -> list[Equivalence]:
        model = Transformer(config, key=jax.random.key(0))
        (tokens,) = _tokens(config)(jax.random.key(1))
        full = eqx.filter_jit(_logits)(model, (tokens,))

        def other(**changes: object) -> jax.Array:
            variant = Transformer(config.with_updates(**changes), key=jax.random.key(0))
            return eqx.filter_jit(_logits)(variant, (tokens,))

        pairs = [
            Equivalence("loop equals scan", lambda: (full, other(scan_layers=True)), atol=1e-5),
            Equivalence("cache equals full forward", lambda: (full, _cached_logits(model, tokens, 5)), atol=1e-5),
        ]
        if not extended:
            return pairs
        loss_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(_next_token_loss))

        def remat(policy: str) -> tuple:
            variant = Transformer(config.with_updates(remat=policy), key=jax.random.key(0))
            return loss_and_grad(model, (tokens,)), loss_and_grad(variant, (tokens,))

        def chunked_loss(m: Transformer) -> jax.Array:
            hidden, _ = m.hidden_states(tokens[:, :-1])
            return chunked_cross_entropy(hidden, m.unembedding(), tokens[:, 1:], chunk_size=3)

        return [
            *pairs,
            Equivalence("remat 'full' equals none", lambda: remat("full"), atol=1e-6),
            Equivalence("remat 'dots_saveable' equals none", lambda: remat("dots_saveable"), atol=1e-6),
            Equivalence(
                "chunked loss equals full-logits loss",
                lambda: (_next_token_loss(model, (tokens,)), eqx.filter_jit(chunked_loss)(model)),
                atol=1e-6,
            ),
        ]

    return build


def transformer_cases() -> list[ContractCase]:
    """One case per transformer preset."""
    # name: (config, run the extended equivalences)
    presets = {
        "gpt2": (TransformerConfig.gpt2_tiny(), True),
        "llama": (TransformerConfig.llama_tiny(), True),
        "qwen": (TransformerConfig.qwen_tiny(), False),
        "mistral": (TransformerConfig.mistral_tiny(), False),
    }
    return [
        ContractCase(
            name=f"transformer-{name}",
            make_model=lambda key, c=config: Transformer(c, key=key),
            make_inputs=_tokens(config),
            apply=_logits,
            loss=_next_token_loss,
            make_low_precision_model=lambda key, c=config: Transformer(
                c.with_updates(compute_dtype="bfloat16"), key=key
            ),
            output_dtype=jnp.float32,
            param_dtype=jnp.float32,
            equivalences=_transformer_equivalences(config, extended),
        )
        for name, (config, extended) in presets.items()
    ]


CASES = [*transformer_cases(), *ssm_cases(), *denoiser_cases(), *vae_cases()]

# The slowest pairs on two CPU cores (about 30-60 s each, mostly compiling the UNet's and mmDiT's
# convolutions and joint attention again under each transformation) run in the slow step; every
# other pair of these two models stays in the default suite.
SLOW = {
    ("unet", "check_jits"),
    ("unet", "check_finite_gradients"),
    ("mmdit", "check_jits"),
    ("mmdit", "check_finite_gradients"),
}


def _check_name(check: Any) -> str:
    return check.__name__


def _pairs() -> list:
    return [
        pytest.param(
            case,
            check,
            id=f"{case.name}-{_check_name(check)}",
            marks=[pytest.mark.slow] if (case.name, _check_name(check)) in SLOW else [],
        )
        for case in CASES
        for check in CHECKS
    ]


@pytest.mark.parametrize(("case", "check"), _pairs())
def test_contract(case: ContractCase, check: Callable[[ContractCase], None]) -> None:
    check(case)
