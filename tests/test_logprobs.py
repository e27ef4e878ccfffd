"""Masked response log-probs: a brute-force per-token loop, chunk-size independence, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import init_params, synthetic_pairs, tiny_config

from dice_jax.errors import DiceError
from dice_jax.models.decoder import Decoder, positions_from_mask
from dice_jax.training.data import PairArrays, build_pairs
from dice_jax.training.logprobs import (
    pair_logprobs,
    pair_logprobs_jit,
    token_logprobs,
    vocab_logsumexp,
)


@pytest.fixture(scope="module")
def model():
    config = tiny_config()
    return config, init_params(config, seed=3)


@pytest.fixture(scope="module")
def data():
    # Prompts up to 12 tokens, responses up to 9: several rows end in padding, and with a
    # chunk of 4 some chunks are all prompt or all padding (skipped).
    return synthetic_pairs(6, seed=5, max_length=32, pad_to_multiple=8, prompt_len=(2, 12),
                           response_len=(1, 9))


def brute_force(config, params, data):
    """numpy: log-softmax of full logits from a plain forward, summed over response tokens."""
    ids = data.input_ids.reshape(-1, data.length)
    mask = data.attention_mask.reshape(ids.shape)
    loss_mask = data.loss_mask.reshape(ids.shape)
    logits = np.asarray(Decoder(config).apply(
        {"params": params}, jnp.asarray(ids), positions_from_mask(jnp.asarray(mask)),
        jnp.asarray(mask)), np.float64)
    sums, counts = np.zeros(len(ids)), np.zeros(len(ids), np.int64)
    for b in range(len(ids)):
        for t in range(1, ids.shape[1]):
            if loss_mask[b, t] and mask[b, t]:
                row = logits[b, t - 1]
                lse = row.max() + np.log(np.sum(np.exp(row - row.max())))
                sums[b] += row[ids[b, t]] - lse
                counts[b] += 1
    return sums.reshape(-1, 2), counts.reshape(-1, 2)


def as_batch(data):
    return {k: jnp.asarray(v) for k, v in data.as_dict().items()}


@pytest.mark.parametrize("vocab", [96, 97, 30, 1])  # 16 parts, prime (1 part), 15 parts, 1
def test_vocab_logsumexp_in_slices_equals_numpy(vocab):
    rng = np.random.default_rng(vocab)
    x = rng.normal(scale=20.0, size=(3, 5, vocab)).astype(np.float32)  # spread: max matters
    x[0, 0, :] = -1e30  # a row of (near) -inf logits stays finite, as one logsumexp would
    ref = np.log(np.sum(np.exp(x.astype(np.float64) - x.max(-1, keepdims=True)), -1)) \
        + x.max(-1)
    got = np.asarray(jax.jit(vocab_logsumexp)(jnp.asarray(x)))
    # float32 logsumexp of logits spread ~20 (values ~60-80) against float64: ~1e-6 rel.
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)
    # Its gradient is the softmax, as for a single log-sum-exp.
    grad = np.asarray(jax.grad(lambda a: jnp.sum(vocab_logsumexp(a)[1:]))(jnp.asarray(x)))
    soft = np.exp(x.astype(np.float64) - ref[..., None])
    soft[0] = 0.0
    # Softmax probabilities (<= 1) in float32 against float64: a few 6e-8 roundoffs.
    np.testing.assert_allclose(grad, soft, atol=1e-6)


def test_matches_brute_force_for_every_chunk_size(model, data):
    config, params = model
    expected, expected_counts = brute_force(config, params, data)
    assert (expected_counts > 0).all() and (data.attention_mask == 0).any()
    for chunk in (1, 4, 7, 32, 128):
        logps, counts = pair_logprobs_jit(params, as_batch(data), config, chunk)
        # Sums of up to 32 float32 token log-probs (~-5 each): chunking reorders the vocab
        # reductions, ~32 roundoffs of ~100 in total (2e-5 abs, 2e-6 rel).
        np.testing.assert_allclose(np.asarray(logps), expected, rtol=2e-6, atol=2e-5)
        np.testing.assert_array_equal(np.asarray(counts), expected_counts)


def test_gradients_do_not_depend_on_chunk_size(model, data):
    config, params = model
    batch = as_batch(data)

    def grads(chunk):
        f = lambda p: jnp.sum(pair_logprobs(p, config, batch, chunk)[0] * jnp.asarray(  # noqa: E731
            [[1.0, -0.5]]))
        return jax.jit(jax.grad(f))(params)

    a, b = grads(4), grads(64)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        # Backward through differently chunked float32 reductions: gradients near zero get
        # atol 1e-6 (~16 roundoffs of the largest terms), the rest 1e-4 relative.
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(a["embed"]).max()) > 0


def test_prompt_and_padding_tokens_do_not_count(model, data):
    config, params = model
    batch = as_batch(data)
    logps, _ = pair_logprobs_jit(params, batch, config, 8)
    # Changing a prompt token changes the response's context (so its log-prob), but changing
    # a padding token must change nothing.
    ids = np.array(data.input_ids)
    pads = np.argwhere(data.attention_mask == 0)
    for p, j, t in pads[:5]:
        ids[p, j, t] = 77
    changed = dict(batch, input_ids=jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(pair_logprobs_jit(params, changed, config, 8)[0]),
                                  np.asarray(logps))


def shared_batch(data, multiple=8):
    return {k: jnp.asarray(v)
            for k, v in data.shared_prompt_dict(*data.split_lengths(multiple)).items()}


def test_shared_prompt_layout_matches_brute_force(model, data):
    """Each prompt run once (its cache shared by both responses) = the plain forward."""
    config, params = model
    expected, expected_counts = brute_force(config, params, data)
    for multiple in (1, 8):  # tight, and with padding on both sides of the prompt
        logps, counts = pair_logprobs_jit(params, shared_batch(data, multiple), config, 4)
        # Sums of up to 32 float32 token log-probs (~-5 each): chunking reorders the vocab
        # reductions, ~32 roundoffs of ~100 in total (2e-5 abs, 2e-6 rel).
        np.testing.assert_allclose(np.asarray(logps), expected, rtol=2e-6, atol=2e-5)
        np.testing.assert_array_equal(np.asarray(counts), expected_counts)


def test_shared_prompt_layout_gradients_match(model, data):
    config, params = model
    weights = jnp.asarray([[1.0, -0.5]])

    def grads(batch):
        f = lambda p: jnp.sum(pair_logprobs(p, config, batch, 4)[0] * weights)  # noqa: E731
        return jax.jit(jax.grad(f))(params)

    a, b = grads(as_batch(data)), grads(shared_batch(data))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        # Backward through differently chunked float32 reductions: gradients near zero get
        # atol 1e-6 (~16 roundoffs of the largest terms), the rest 1e-4 relative.
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_shared_prompt_layout_of_an_empty_prompt():
    """An empty prompt: the first response token has nothing to be scored by, as in the
    right-padded layout."""
    config = tiny_config()
    params = init_params(config, seed=1)
    data, _ = build_pairs([([], [5, 6, 7, 2], [8, 2]), ([9, 10], [11, 2], [12, 13, 14, 2])],
                          max_length=16, max_prompt_length=8, pad_to_multiple=4)
    assert (data.prompt_lengths() == 0).any()
    expected, expected_counts = pair_logprobs_jit(params, as_batch(data), config, 4)
    logps, counts = pair_logprobs_jit(params, shared_batch(data), config, 4)
    # As above: the same sums over differently laid-out float32 reductions.
    np.testing.assert_allclose(np.asarray(logps), np.asarray(expected), rtol=2e-6, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(expected_counts))


def test_shared_prompt_layout_rejects_pairs_with_different_prompts(data):
    ids = np.array(data.input_ids)
    ids[2, 1, 0] = ids[2, 0, 0] + 1
    broken = PairArrays(ids, data.attention_mask, data.loss_mask)
    with pytest.raises(DiceError, match="pair 2: chosen and rejected do not share"):
        broken.prompt_lengths()
    with pytest.raises(DiceError, match=r"pair 0: prompt of .* longer than"):
        data.shared_prompt_dict(1, 64)


def test_never_materialises_full_float32_log_softmax():
    config = tiny_config(vocab_size=4096)
    params = init_params(config)
    b, length = 16, 256
    hidden = jnp.ones((b, length, config.hidden_size))
    ids = jnp.ones((b, length), jnp.int32)
    full = b * length * config.vocab_size * 4

    def temp_bytes(chunk):
        fn = jax.grad(lambda p, h: jnp.sum(token_logprobs(p, config, h, ids, ids, chunk)),
                      argnums=(0, 1))
        return jax.jit(fn).lower(params, hidden).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(16) < 0.5 * full      # chunked: a fraction of one [b, L, V] f32 array
    assert temp_bytes(length) >= full       # unchunked: the full array (the check can fail)
