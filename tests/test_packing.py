"""Packed tokens (`models.packing`): index maps against numpy, and the packed decoder
forward (prefill + responses against the KV cache) against a plain per-row forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import init_params, tiny_config

from dice_jax.models.decoder import Decoder
from dice_jax.models.packing import pack, packed_capacity, packing_from_mask, unpack
from dice_jax.training.logprobs import prefill_prompts, response_logprobs


def test_pack_and_unpack_match_numpy():
    rng = np.random.default_rng(0)
    mask = rng.random((5, 7)) < 0.6
    mask[2] = False  # a row with no token
    n = int(mask.sum())
    capacity = packed_capacity(n, shards=2, step=4)
    assert capacity % 8 == 0 and n <= capacity < n + 8
    packing = packing_from_mask(mask, capacity, shards=2)
    assert packing.token_slot.shape == (2, capacity // 2)
    x = rng.normal(size=(5, 7, 3)).astype(np.float32)
    packed = np.asarray(pack(jnp.asarray(x), packing))
    assert packed.shape == (2, capacity // 2, 3)
    flat = packed.reshape(capacity, 3)
    np.testing.assert_array_equal(flat[:n], x[mask])  # row-major order of the real slots
    np.testing.assert_array_equal(flat[n:], 0)
    back = np.asarray(unpack(jnp.asarray(packed), packing))
    np.testing.assert_array_equal(back, np.where(mask[..., None], x, 0))
    assert packed_capacity(0) == 128 and packed_capacity(129) == 256
    assert packed_capacity(300, shards=4, step=64) == 512


def test_packing_rejects_bad_capacity():
    mask = np.ones((2, 3), bool)
    with pytest.raises(ValueError, match="6 real tokens do not fit a packed capacity of 4"):
        packing_from_mask(mask, 4)
    with pytest.raises(ValueError, match="not a multiple of 4 shards"):
        packing_from_mask(mask, 6, shards=4)


def plain_logprobs(config, params, prompt, response):
    """float64 numpy: a plain forward of prompt + response as one unpadded row, the
    log-softmax of its full logits summed over the response tokens."""
    ids = np.asarray([list(prompt) + list(response)], np.int32)
    if len(response) == 0:
        return 0.0
    logits = np.asarray(Decoder(config).apply(
        {"params": params}, jnp.asarray(ids), jnp.arange(ids.shape[1])[None],
        jnp.ones_like(ids)), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                           keepdims=True)) - logits.max(-1, keepdims=True)
    p = len(prompt)
    return float(sum(logp[p + j - 1, t] for j, t in enumerate(response)))


def test_packed_forward_equals_plain_rows():
    """Prefill and responses with packed tokens (two shards) give the same KV cache at the
    real slots as the padded layout, and each row's summed response log-probs equal a
    plain unpadded forward of prompt + response."""
    config = tiny_config()
    params = init_params(config, seed=7)
    rng = np.random.default_rng(1)
    vocab = config.vocab_size
    prompts = [rng.integers(3, vocab, n).tolist() for n in (6, 1, 9)]
    responses = [rng.integers(3, vocab, n).tolist() for n in (5, 11, 0, 3)]
    row_prompt = np.array([0, 1, 2, 0], np.int32)
    width, length = 10, 12
    prompt_ids = np.zeros((3, width), np.int32)
    prompt_mask = np.zeros((3, width), np.int32)
    for g, p in enumerate(prompts):  # left-padded
        prompt_ids[g, width - len(p):] = p
        prompt_mask[g, width - len(p):] = 1
    resp_ids = np.zeros((4, length), np.int32)
    resp_mask = np.zeros((4, length), np.int32)
    for r, y in enumerate(responses):  # right-padded
        resp_ids[r, :len(y)] = y
        resp_mask[r, :len(y)] = 1

    pp = packing_from_mask(prompt_mask, packed_capacity(prompt_mask.sum(), 2, 4), 2)
    rp = packing_from_mask(resp_mask, packed_capacity(resp_mask.sum(), 2, 4), 2)
    ids, mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
    cache, last = jax.jit(prefill_prompts, static_argnums=1)(params, config, ids, mask, pp)
    cache0, last0 = jax.jit(prefill_prompts, static_argnums=1)(params, config, ids, mask)
    real = prompt_mask.astype(bool)
    # float32; packing changes only the reduction layout (K/V ~1): roundoff, 1e-5.
    for name in ("k", "v"):
        np.testing.assert_allclose(np.asarray(cache[name])[:, real],
                                   np.asarray(cache0[name])[:, real], atol=1e-5)
    np.testing.assert_allclose(np.asarray(last), np.asarray(last0), atol=1e-5)

    rows_cache = {name: a[:, row_prompt] for name, a in cache.items()}
    fn = jax.jit(response_logprobs, static_argnums=(1, 7))
    logps, counts = fn(params, config, rows_cache, last[row_prompt],
                       mask[row_prompt], jnp.asarray(resp_ids), jnp.asarray(resp_mask), 4, rp)
    want = [plain_logprobs(config, params, prompts[g], y) for g, y in zip(row_prompt,
                                                                          responses)]
    # Sums of up to 11 float32 token log-probs (~-5 each) in a different layout: 1e-4.
    np.testing.assert_allclose(np.asarray(logps), want, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(counts), [5, 11, 0, 3])
