"""Rotary position embeddings (RoPE), with the "llama3" frequency scaling of Llama 3.1/3.2.

The layout is Hugging Face's: the two rotated halves of a head are the first and second
half of `head_dim` (`rotate_half`), not interleaved pairs as in llama.cpp / Meta's code.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dice_jax.models.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float,
                        scaling: RopeScaling | None = None) -> np.ndarray:
    """Per-pair inverse frequencies, float32 `[head_dim // 2]`.

    With `scaling`, low frequencies are divided by `factor`, high ones kept, and the band
    between smoothly interpolated (HF `_compute_llama3_parameters`).
    """
    exponents = (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                 / np.float32(head_dim))
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables, float32 `[batch, length, head_dim]`.

    `positions` are int `[batch, length]`; `inv_freq` from `inverse_frequencies`.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates `x [batch, length, heads, head_dim]` by the tables of `rope_cos_sin`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
