"""Shared helpers for the training tests: tiny random params and synthetic preference data."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dice_jax.models.decoder import Decoder
from dice_jax.models.presets import tiny
from dice_jax.training.data import PairArrays, build_pairs


def tiny_config(**kw):
    return tiny(**kw)


def init_params(config, seed: int = 0):
    ids = jnp.ones((1, 4), jnp.int32)
    return nn.unbox(jax.jit(Decoder(config).init)(jax.random.key(seed), ids, ids, ids)
                    )["params"]


def synthetic_triples(n: int, vocab: int = 256, seed: int = 0, eos: int = 2,
                      prompt_len: tuple[int, int] = (3, 9), response_len: tuple[int, int] = (2, 7)):
    """Chosen responses repeat the prompt's first token; rejected ones are random tokens.

    A learnable rule: the reward model implied by a trained policy should prefer chosen.
    """
    rng = np.random.default_rng(seed)
    triples = []
    for _ in range(n):
        prompt = rng.integers(3, vocab, rng.integers(*prompt_len)).tolist()
        k = int(rng.integers(*response_len))
        chosen = [prompt[0]] * k + [eos]
        rejected = [*rng.integers(3, vocab, int(rng.integers(*response_len))).tolist(), eos]
        triples.append((prompt, chosen, rejected))
    return triples


def synthetic_pairs(n: int, vocab: int = 256, seed: int = 0, max_length: int = 32,
                    pad_to_multiple: int = 16, **kw) -> PairArrays:
    arrays, _ = build_pairs(synthetic_triples(n, vocab, seed, **kw), max_length=max_length,
                            max_prompt_length=max_length // 2, pad_token_id=0,
                            pad_to_multiple=pad_to_multiple)
    return arrays
