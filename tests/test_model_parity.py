"""Imported tiny HF models give transformers' logits on padded batches (<= 1e-4, float32)."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import hf_logits, padded_batch, save_hf, tiny_hf_model

from dice_jax.checkpoints.hf import import_hf_folder
from dice_jax.models.decoder import Decoder, positions_from_mask


def jax_logits(params, config, ids, mask):
    positions = positions_from_mask(jnp.asarray(mask))
    out = Decoder(config).apply({"params": params}, jnp.asarray(ids), positions, jnp.asarray(mask))
    return np.asarray(out, np.float32)


@pytest.mark.parametrize("kind", ["llama", "llama_untied", "mistral"])
def test_logits_match_transformers_on_padded_batch(kind, tmp_path):
    model = tiny_hf_model(kind)
    folder = save_hf(model, str(tmp_path / kind))
    params, config = import_hf_folder(folder)
    assert config.tie_word_embeddings == (kind == "llama")
    assert (config.rope_scaling is not None) == (kind == "llama")
    assert config.num_kv_heads < config.num_heads
    if kind == "mistral":
        assert config.sliding_window == 5
    # Rows of 12 tokens: longer than the sliding window and the llama3 original context.
    ids, mask = padded_batch(config.vocab_size, [12, 7, 12, 3], 12,
                             left=[False, True, False, False], seed=1)
    ref = hf_logits(model, ids, mask)
    ours = jax_logits(params, config, ids, mask)
    real = mask.astype(bool)
    assert np.max(np.abs(ours[real] - ref[real])) <= 1e-4


def test_sliding_window_changes_logits(tmp_path):
    """Guard: the Mistral test above is only meaningful if the window bites."""
    model = tiny_hf_model("mistral")
    params, config = import_hf_folder(save_hf(model, str(tmp_path / "m")))
    ids, mask = padded_batch(config.vocab_size, [12], 12, left=[False], seed=2)
    windowed = jax_logits(params, config, ids, mask)
    full = jax_logits(params, config.replace(sliding_window=None), ids, mask)
    assert np.allclose(windowed[0, :5], full[0, :5], atol=1e-5)
    assert np.max(np.abs(windowed[0, 5:] - full[0, 5:])) > 1e-3


def test_bfloat16_compute_close_to_float32(tmp_path):
    model = tiny_hf_model("llama")
    params, config = import_hf_folder(save_hf(model, str(tmp_path / "l")))
    ids, mask = padded_batch(config.vocab_size, [10, 6], 10, left=[True, False], seed=3)
    f32 = jax_logits(params, config, ids, mask)
    bf16 = jax_logits(params, config.replace(dtype="bfloat16"), ids, mask)
    real = mask.astype(bool)
    assert np.max(np.abs(f32[real] - bf16[real])) < 0.1
    assert np.mean(np.argmax(f32[real], -1) == np.argmax(bf16[real], -1)) > 0.9
