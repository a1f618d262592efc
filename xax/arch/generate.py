"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling.

``generate`` is one jitted function: a prefill pass writes the prompt into the cache, then a
``jax.lax.scan`` feeds one token per step. Prompts of different lengths are left-padded (real tokens
at the right end) and described by ``prompt_mask``; their positions count real tokens only.
"""

from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from xax.arch.config import ModelConfigError
from xax.arch.transformer import Transformer
from xax.core.config import field, register_config
from xax.core.errors import ConfigError


@register_config
@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is drawn from the logits. The defaults draw from the model's distribution as is."""

    temperature: float = field(1.0, help="Logits are divided by it; 1 leaves them as they are, 0 is greedy decoding")
    top_k: int | None = field(None, help="Draw only from the top_k most likely tokens; None: no limit")
    top_p: float | None = field(
        None,
        help="Nucleus sampling (Holtzman et al. 2019): only the smallest set of most likely tokens whose "
        "probability reaches top_p; None: no limit",
    )

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ModelConfigError(f"SamplingConfig.temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ModelConfigError(f"SamplingConfig.top_k={self.top_k} must be a positive integer or None")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ModelConfigError(f"SamplingConfig.top_p={self.top_p} must be in (0, 1] or None")


def filter_logits(logits: Float[Array, "batch vocab"], sampling: SamplingConfig) -> Float[Array, "batch vocab"]:
    """Applies temperature, top-k and top-p; excluded tokens get -inf.

    Args:
        logits: float32 logits (B, V).
        sampling: The sampling settings (temperature > 0).

    Returns:
        The filtered, temperature-scaled logits.
    """
    logits = logits / sampling.temperature
    neg_inf = jnp.full_like(logits, -jnp.inf)
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, neg_inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1, descending=True)  # (B, V)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # A token is kept if the mass strictly before it is below top_p (the first is always kept).
        keep = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < sampling.top_p
        count = jnp.sum(keep, axis=-1, keepdims=True)  # (B, 1)
        threshold = jnp.take_along_axis(sorted_logits, count - 1, axis=-1)  # (B, 1)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


def sample_token(
    logits: Float[Array, "batch vocab"], sampling: SamplingConfig, key: PRNGKeyArray
) -> Int[Array, " batch"]:
    """Draws one token per row: arg-max when ``temperature == 0``, else from the filtered softmax."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


class GenerateOutput(eqx.Module):
    """What ``generate`` returns.

    Attributes:
        tokens: The new tokens (B, N); after ``eos_id`` a row repeats ``eos_id``.
        logits: The float32 logits each new token was drawn from (B, N, V), if requested.
    """

    tokens: Int[Array, "batch new"]
    logits: Float[Array, "batch new vocab"] | None


@eqx.filter_jit
def generate(
    model: Transformer,
    prompt: Int[Array, "batch prompt"],
    *,
    max_new_tokens: int,
    key: PRNGKeyArray,
    sampling: SamplingConfig = SamplingConfig(),
    prompt_mask: Bool[Array, "batch prompt"] | None = None,
    eos_id: int | None = None,
    return_logits: bool = False,
    check_ids: bool = False,
) -> GenerateOutput:
    """Generates ``max_new_tokens`` tokens after each prompt, batched, with the KV cache.

    Args:
        model: The language model.
        prompt: Prompt token ids (B, P), left-padded when lengths differ.
        max_new_tokens: N, the number of tokens to generate (static).
        key: The PRNG key for sampling.
        sampling: Greedy / temperature / top-k / top-p settings (static).
        prompt_mask: True at real prompt tokens (B, P); None when no prompt is padded. The last
            column must be real in every row (left padding).
        eos_id: If set, a row that produced it keeps producing it.
        return_logits: Whether to return the logits of every step (B, N, V).
        check_ids: Check that every prompt id is in [0, vocab_size) (see ``Transformer.hidden_states``):
            wrap a call with this set in ``checkify.checkify`` (e.g. ``checkify.checkify(lambda p:
            generate(model, p, ..., check_ids=True))(prompt)``), then ``err.throw()``. Off by default,
            and then prompt ids are not checked (an id past the vocabulary gives NaN logits).

    Returns:
        The new tokens and, if requested, their logits.

    Raises:
        ConfigError: With learned positions, when prompt + new tokens exceed the model's max_seq_len.
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be positive, got {max_new_tokens}")
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    if model.config.positions == "learned" and total > model.config.max_seq_len:
        raise ConfigError(
            f"generate: prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {total} tokens exceeds the "
            f"model's max_seq_len={model.config.max_seq_len}; generate fewer tokens or shorten the prompt"
        )
    mask = jnp.ones((batch, prompt_len), dtype=bool) if prompt_mask is None else prompt_mask
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)  # (B, P)
    keys = jax.random.split(key, max_new_tokens)

    cache = model.init_cache(batch, total)
    # (B, P, V); only the prompt is checked, as sampled tokens are in range by construction.
    logits, cache = model(prompt, positions=positions, padding_mask=prompt_mask, cache=cache, check_ids=check_ids)
    first_logits = logits[:, -1]  # (B, V)
    first = sample_token(first_logits, sampling, keys[0])  # (B,)
    done = jnp.zeros((batch,), dtype=bool) if eos_id is None else first == eos_id

    def step(carry: tuple, step_key: Array) -> tuple[tuple, tuple[Array, Array | None]]:
        cache, token, position, done = carry
        logits, cache = model(token[:, None], positions=position[:, None], cache=cache)  # (B, 1, V)
        next_token = sample_token(logits[:, 0], sampling, step_key)
        if eos_id is not None:
            next_token = jnp.where(done, jnp.int32(eos_id), next_token)
            done = done | (next_token == eos_id)
        return (cache, next_token, position + 1, done), (next_token, logits[:, 0] if return_logits else None)

    carry = (cache, first, positions[:, -1] + 1, done)
    _, (rest, rest_logits) = jax.lax.scan(step, carry, keys[1:])  # (N-1, B), (N-1, B, V)
    tokens = jnp.concatenate([first[:, None], rest.T], axis=1)  # (B, N)
    all_logits = None
    if rest_logits is not None:
        all_logits = jnp.concatenate([first_logits[:, None], jnp.swapaxes(rest_logits, 0, 1)], axis=1)
    return GenerateOutput(tokens=tokens, logits=all_logits)
