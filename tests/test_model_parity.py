"""Imported tiny HF models give transformers' logits on padded batches (<= 1e-4, float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import hf_logits, padded_batch, save_hf, tiny_hf_model

from dice_jax.checkpoints.hf import import_hf_folder
from dice_jax.models.decoder import (
    Decoder,
    attention_allowed,
    grouped_attention,
    positions_from_mask,
)


def jax_logits(params, config, ids, mask):
    positions = positions_from_mask(jnp.asarray(mask))
    out = Decoder(config).apply({"params": params}, jnp.asarray(ids), positions, jnp.asarray(mask))
    return np.asarray(out, np.float32)


@pytest.mark.parametrize("kind,total", [("llama", 12), ("llama_untied", 12), ("mistral", 12),
                                        ("llama", 150), ("mistral", 150)])
def test_logits_match_transformers_on_padded_batch(kind, total, tmp_path):
    """Rows of 150 tokens run attention in causal query blocks (64, 64, 22)."""
    model = tiny_hf_model(kind)
    folder = save_hf(model, str(tmp_path / kind))
    params, config = import_hf_folder(folder)
    assert config.tie_word_embeddings == (kind == "llama")
    assert (config.rope_scaling is not None) == (kind == "llama")
    assert config.num_kv_heads < config.num_heads
    if kind == "mistral":
        assert config.sliding_window == 5
    # Rows of 12 tokens: longer than the sliding window and the llama3 original context.
    ids, mask = padded_batch(config.vocab_size, [total, 7 * total // 12, total, 3], total,
                             left=[False, True, False, False], seed=1)
    ref = hf_logits(model, ids, mask)
    ours = jax_logits(params, config, ids, mask)
    real = mask.astype(bool)
    # float32 both sides, XLA vs PyTorch matmul order over 2 layers of width 64, logits
    # ~1-10: observed ~1e-6; 1e-4 is still far below any mapping error (~0.1-1).
    assert np.max(np.abs(ours[real] - ref[real])) <= 1e-4


def test_sliding_window_changes_logits(tmp_path):
    """Guard: the Mistral test above is only meaningful if the window bites."""
    model = tiny_hf_model("mistral")
    params, config = import_hf_folder(save_hf(model, str(tmp_path / "m")))
    ids, mask = padded_batch(config.vocab_size, [12], 12, left=[False], seed=2)
    windowed = jax_logits(params, config, ids, mask)
    full = jax_logits(params, config.replace(sliding_window=None), ids, mask)
    # Same float32 model, only the mask differs (and the fused kernel may reorder).
    assert np.allclose(windowed[0, :5], full[0, :5], atol=1e-5)
    assert np.max(np.abs(windowed[0, 5:] - full[0, 5:])) > 1e-3


def test_bfloat16_compute_close_to_float32(tmp_path):
    model = tiny_hf_model("llama")
    params, config = import_hf_folder(save_hf(model, str(tmp_path / "l")))
    ids, mask = padded_batch(config.vocab_size, [10, 6], 10, left=[True, False], seed=3)
    f32 = jax_logits(params, config, ids, mask)
    bf16 = jax_logits(params, config.replace(dtype="bfloat16"), ids, mask)
    real = mask.astype(bool)
    # bfloat16 keeps 8 mantissa bits (2**-9 = 0.2% rounding per op) on logits ~1-10
    # through 2 layers: a few 0.01; a wrong cast (garbage) would be off by >= 1.
    assert np.max(np.abs(f32[real] - bf16[real])) < 0.1
    assert np.mean(np.argmax(f32[real], -1) == np.argmax(bf16[real], -1)) > 0.9


def numpy_attention(q, k, v, allowed):
    """Brute force: every (row, head, query) softmax over its allowed keys, float64 (a
    query that may see no key, a padding slot, gets zeros: its output is never used)."""
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros((b, t, h, d))
    for r in range(b):
        for head in range(h):
            for i in range(t):
                ok = allowed[r, 0, 0, i]
                if ok.any():
                    s = k[r, :, head // group] @ q[r, i, head] / np.sqrt(d)
                    w = np.where(ok, np.exp(s - s[ok].max()), 0.0)
                    out[r, i, head] = (w / w.sum()) @ v[r, :, head // group]
    return out


@pytest.mark.parametrize("offset,window", [(0, None), (40, None), (40, 30)])
def test_blocked_causal_attention_matches_brute_force(offset, window):
    """Queries at slots offset.. of a key axis (as in a prefill or a scoring extend), with
    padded keys: the causal blocks (64 + 64 + 72 queries) give the brute-force result."""
    rng = np.random.default_rng(offset + (window or 0))
    b, t, h, kv, d = 3, 200, 6, 2, 8
    keys = offset + t
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, keys, kv, d)).astype(np.float32) for _ in range(2))
    valid = np.ones((b, keys), np.int32)
    valid[1, :25] = 0          # a left-padded prompt
    valid[2, keys - 50:] = 0   # a right-padded response
    slots_q = np.broadcast_to(offset + np.arange(t), (b, t))
    slots_k = np.broadcast_to(np.arange(keys), (b, keys))
    allowed = attention_allowed(jnp.asarray(slots_q), jnp.asarray(slots_k),
                                jnp.asarray(valid), window)
    blocked = grouped_attention(*(jnp.asarray(a) for a in (q, k, v)), allowed, offset)
    ref = numpy_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                          np.asarray(allowed))
    sees = np.asarray(allowed)[:, 0, 0].any(-1)  # [b, t]
    assert sees.mean() > 0.7
    # float32 blocked softmax-attention against float64 numpy on O(1) values.
    assert np.max(np.abs(np.asarray(blocked) - ref)[sees]) < 1e-5


@pytest.mark.parametrize("offset,window", [(0, None), (40, 30)])
def test_attention_gradients_match_plain_softmax_attention(offset, window):
    """Gradients of `grouped_attention` (causal query blocks, the softmax normalised after
    the value product) = autodiff of a plain dense softmax attention, for q, k and v."""
    rng = np.random.default_rng(7 + offset)
    b, t, h, kv, d = 2, 150, 6, 2, 8
    keys = offset + t
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, keys, kv, d)), jnp.float32) for _ in range(2))
    valid = np.ones((b, keys), np.int32)
    valid[1, :25] = 0
    allowed = attention_allowed(jnp.broadcast_to(offset + jnp.arange(t), (b, t)),
                                jnp.broadcast_to(jnp.arange(keys), (b, keys)),
                                jnp.asarray(valid), window)
    sees = np.asarray(allowed)[:, 0, 0].any(-1)  # queries with a key to see
    weights = jnp.asarray(rng.standard_normal((b, t, h, d)) * sees[..., None, None],
                          jnp.float32)

    def plain(q, k, v):
        k, v = (jnp.repeat(x, h // kv, axis=2) for x in (k, v))
        s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
        p = jax.nn.softmax(jnp.where(allowed[:, 0], s, -1e30), axis=-1)
        return jnp.einsum("bhts,bshd->bthd", p, v)

    def grad(fn):
        # One jitted program per attention, not hundreds of eagerly compiled ops.
        return jax.jit(jax.grad(lambda *a: jnp.sum(weights * fn(*a)), argnums=(0, 1, 2)))(
            q, k, v)

    want = grad(plain)
    for blocks in (offset, None):  # causal query blocks, one block
        got = grad(lambda q, k, v, o=blocks: grouped_attention(q, k, v, allowed, o))
        for x, y in zip(got, want):
            # Backward through differently blocked float32 softmax sums: 1e-4 relative, and
            # 1e-5 absolute for gradients near zero.
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
