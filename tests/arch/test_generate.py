"""Generation: cached decoding equals the full forward; sampling filters against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from xax.arch.generate import SamplingConfig, filter_logits, generate, sample_token
from xax.arch.transformer import Transformer, TransformerConfig
from xax.core.errors import ConfigError


@pytest.mark.parametrize("preset", ["gpt2_tiny", "llama_tiny"])
def test_greedy_generation_logits_equal_full_forward(preset: str) -> None:
    config = getattr(TransformerConfig, preset)()
    model = Transformer(config, key=jax.random.key(0))
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, config.vocab_size)
    out = generate(
        model, prompt, max_new_tokens=6, key=jax.random.key(2), sampling=SamplingConfig(0.0), return_logits=True
    )
    assert out.tokens.shape == (2, 6)
    sequence = jnp.concatenate([prompt, out.tokens], axis=1)  # (B, 11)
    full, _ = jax.jit(model.__call__)(sequence)
    # Token i was drawn from the logits at position P - 1 + i.
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(full[:, 4:-1]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(jnp.argmax(full[:, 4:-1], axis=-1)))


def test_left_padded_prompts_generate_like_unpadded() -> None:
    config = TransformerConfig.llama_tiny()
    model = Transformer(config, key=jax.random.key(0))
    short = jax.random.randint(jax.random.key(1), (1, 3), 0, config.vocab_size)
    long = jax.random.randint(jax.random.key(2), (1, 6), 0, config.vocab_size)
    padded = jnp.concatenate([jnp.concatenate([jnp.zeros((1, 3), jnp.int32), short], axis=1), long], axis=0)
    mask = jnp.array([[False] * 3 + [True] * 3, [True] * 6])
    greedy = SamplingConfig(0.0)
    both = generate(model, padded, prompt_mask=mask, max_new_tokens=4, key=jax.random.key(3), sampling=greedy)
    alone = generate(model, short, max_new_tokens=4, key=jax.random.key(3), sampling=greedy)
    np.testing.assert_array_equal(np.asarray(both.tokens[0]), np.asarray(alone.tokens[0]))


def test_eos_repeats_after_first_occurrence() -> None:
    config = TransformerConfig.gpt2_tiny()
    model = Transformer(config, key=jax.random.key(0))
    prompt = jax.random.randint(jax.random.key(1), (3, 4), 0, config.vocab_size)
    sampling = SamplingConfig(2.0)
    free = np.asarray(generate(model, prompt, max_new_tokens=8, key=jax.random.key(2), sampling=sampling).tokens)
    # The end token is one the first row samples at its third step: that row certainly reaches it.
    eos = int(free[0, 2])
    out = np.asarray(
        generate(model, prompt, max_new_tokens=8, key=jax.random.key(2), sampling=sampling, eos_id=eos).tokens
    )
    stopped = 0
    for row, free_row in zip(out, free, strict=True):
        hits = np.flatnonzero(free_row == eos)
        if hits.size == 0:
            np.testing.assert_array_equal(row, free_row)  # never produced: generation is unchanged
            continue
        first = int(hits[0])
        # Up to its first end token a row samples as without one (same keys, same inputs); then it repeats it.
        np.testing.assert_array_equal(row[: first + 1], free_row[: first + 1])
        assert np.all(row[first:] == eos)
        stopped += first < 7
    assert stopped >= 1
    assert not np.all(free[0, 3:] == eos)  # without eos_id the first row goes on to other tokens


def test_top_k_and_top_p_keep_the_right_sets() -> None:
    probs = np.array([[0.5, 0.2, 0.15, 0.1, 0.05]], dtype=np.float32)
    logits = jnp.log(jnp.asarray(probs))
    kept_k = np.isfinite(np.asarray(filter_logits(logits, SamplingConfig(1.0, top_k=2))))
    np.testing.assert_array_equal(kept_k, [[True, True, False, False, False]])
    # The smallest set reaching 0.8: 0.5 + 0.2 + 0.15 = 0.85.
    kept_p = np.isfinite(np.asarray(filter_logits(logits, SamplingConfig(1.0, top_p=0.8))))
    np.testing.assert_array_equal(kept_p, [[True, True, True, False, False]])
    kept_small = np.isfinite(np.asarray(filter_logits(logits, SamplingConfig(1.0, top_p=0.1))))
    np.testing.assert_array_equal(kept_small, [[True, False, False, False, False]])


def test_sampling_frequencies_follow_temperature_scaled_softmax() -> None:
    logits = jnp.log(jnp.array([[0.6, 0.3, 0.1]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = jax.vmap(lambda k: sample_token(logits, SamplingConfig(2.0), k))(keys)[:, 0]
    expected = jax.nn.softmax(logits[0] / 2.0)
    freq = np.bincount(np.asarray(draws), minlength=3) / draws.shape[0]
    # Binomial standard error at n=4000 is below 0.008; allow four of them.
    np.testing.assert_allclose(freq, np.asarray(expected), atol=0.03)
    assert int(sample_token(logits, SamplingConfig(0.0), keys[0])[0]) == 0


def test_sampling_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match=r"top_p=1.5 must be in \(0, 1\]"):
        SamplingConfig(top_p=1.5)


def test_generation_past_max_seq_len_is_refused() -> None:
    model = Transformer(TransformerConfig.gpt2_tiny(), key=jax.random.key(0))
    prompt = jnp.zeros((1, 60), jnp.int32)
    with pytest.raises(
        ConfigError, match=r"prompt \(60\) \+ max_new_tokens \(5\) = 65 tokens exceeds .*max_seq_len=64"
    ):
        generate(model, prompt, max_new_tokens=5, key=jax.random.key(1))
    assert generate(model, prompt, max_new_tokens=4, key=jax.random.key(1)).tokens.shape == (1, 4)


@pytest.mark.parametrize("bad", [128, -1])
def test_out_of_range_prompt_id_raises_in_checked_mode(bad: int) -> None:
    model = Transformer(TransformerConfig.llama_tiny(), key=jax.random.key(0))
    prompt = jnp.zeros((2, 5), jnp.int32).at[0, 4].set(bad)
    checked = checkify.checkify(lambda p: generate(model, p, max_new_tokens=3, key=jax.random.key(1), check_ids=True))
    error, _ = jax.jit(checked)(prompt)
    with pytest.raises(checkify.JaxRuntimeError, match=rf"tokens\[0, 4\] = {bad} is outside \[0, vocab_size=128\)"):
        error.throw()
    error, out = jax.jit(checked)(prompt.at[0, 4].set(7))
    error.throw()
    expected = generate(model, prompt.at[0, 4].set(7), max_new_tokens=3, key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
