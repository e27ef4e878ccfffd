"""The next-token distribution: temperature, top-k and top-p filtering, and the draw.

Pure functions on logits `[rows, vocab]`, applied in Hugging Face's order (temperature, then
top-k, then top-p), so the filtered distribution is the one
`transformers.generate(do_sample=True, temperature=..., top_k=..., top_p=...)` samples from.

No full sort of the vocabulary is needed (XLA's CPU sort of 128 x 49k logits takes ~1 s):

* top-k keeps the tokens whose value is at least the k-th largest (`lax.top_k`), ties kept
  as in HF;
* top-p first looks for the nucleus among the `candidates` most likely tokens (`lax.top_k`);
  only when some row's nucleus is larger does an exact bisection over the bit patterns of
  the float32 weights run over the whole vocabulary for the batch;
* the draw inverts the CDF of the kept weights in vocabulary order with one uniform per row
  (two levels: blocks of 128 tokens, then tokens), so a row's token depends only on its
  logits and its key, whichever path found the cut-off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = float("-inf")
CANDIDATES = 64
_FEW_ROWS = 8
_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class Distribution:
    """How the next token is chosen. `temperature == 0` means greedy (first argmax).

    `top_k == 0` and `top_p == 1` switch those filters off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def token_logprobs(logits: Array, tokens: Array) -> Array:
    """Float32 log-softmax of the untempered `logits [rows, vocab]` at `tokens [rows]`."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def largest_threshold(ok: Callable[[Array], Array], rows: int) -> Array:
    """Per row, the largest non-negative float32 `t` with `ok(t)`, float32 `[rows]`.

    `ok(t [rows, 1]) -> bool [rows]` must hold at `t = 0` and be monotone (true up to the
    answer, false above). Bisection over the int32 bit patterns of float32, which are
    ordered like the values for non-negative floats: 31 passes, exact.
    """
    lo = jnp.zeros((rows,), jnp.int32)
    hi = jnp.full((rows,), 0x7F800000, jnp.int32)  # +inf

    def step(_: int, bounds: tuple[Array, Array]) -> tuple[Array, Array]:
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        good = ok(jax.lax.bitcast_convert_type(mid, jnp.float32)[:, None])
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, step, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def nucleus_threshold_exact(weights: Array, p: float) -> Array:
    """The top-p cut-off of non-negative `weights [rows, vocab]` (unnormalised), `[rows]`.

    The smallest weight kept when tokens are kept from the heaviest down until their mass
    reaches `p * total`: the largest `t` with `sum(weights >= t) >= p * total`.
    """
    target = p * jnp.sum(weights, axis=-1)

    def mass_reaches(t: Array) -> Array:
        return jnp.sum(jnp.where(weights >= t, weights, 0.0), axis=-1) >= target

    return largest_threshold(mass_reaches, weights.shape[0])


def nucleus_threshold_candidates(top_weights: Array, total: Array, p: float
                                 ) -> tuple[Array, Array]:
    """The top-p cut-off found among the heaviest tokens only.

    `top_weights [rows, C]` sorted descending, `total [rows]` the mass of all kept tokens.
    A token is in the nucleus when the mass strictly heavier than it is below `p * total`
    (HF's `TopPLogitsWarper`). Returns the smallest nucleus weight `[rows]` and whether the
    nucleus ends within the C candidates, bool `[rows]` (else the cut-off is not valid).
    """
    cum = jnp.cumsum(top_weights, axis=-1)
    target = p * total
    inside = (cum - top_weights) < target[:, None]
    count = jnp.sum(inside.astype(jnp.int32), axis=-1)
    cutoff = jnp.take_along_axis(top_weights, (count - 1)[:, None], axis=-1)[:, 0]
    return cutoff, cum[:, -1] >= target


def kept_weights(logits: Array, dist: Distribution, candidates: int = CANDIDATES) -> Array:
    """Unnormalised probabilities after temperature, top-k and top-p, float32 `[rows, vocab]`.

    `exp(logits / T - max)` where kept, exactly 0 where filtered out. `dist.temperature`
    must be > 0. Cut-offs are compared with the very values they were taken from
    (materialised behind `optimization_barrier`): XLA may otherwise recompute an
    elementwise expression in two fusions with different rounding and drop the top token.
    """
    scaled = _materialise(logits.astype(jnp.float32) / jnp.float32(dist.temperature))
    vocab = scaled.shape[-1]
    if 0 < dist.top_k < vocab:
        kth = _materialise(jax.lax.top_k(scaled, dist.top_k)[0])[:, -1:]
        scaled = jnp.where(scaled >= kth, scaled, NEG_INF)
    weights = _materialise(jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True)))
    if dist.top_p >= 1.0:
        return weights
    limit = min(candidates, dist.top_k or vocab, vocab)
    top = _materialise(jax.lax.top_k(weights, limit)[0])
    fast, complete = nucleus_threshold_candidates(top, jnp.sum(weights, -1), dist.top_p)
    cutoff = _complete_cutoffs(weights, fast, complete, dist.top_p)
    return jnp.where(weights >= cutoff[:, None], weights, 0.0)


def _materialise(x: Array) -> Array:
    """`x` computed once (not re-fused into consumers); also keeps XLA from rewriting a
    sliced `top_k` into a full sort."""
    return jax.lax.optimization_barrier(x)


def _complete_cutoffs(weights: Array, cutoff: Array, complete: Array, p: float) -> Array:
    """Replaces the cut-offs of the rows whose nucleus outgrew the candidates `[rows]`.

    Such rows are gathered `_FEW_ROWS` at a time and bisected (`nucleus_threshold_exact`),
    in a loop that runs no pass when every row is complete. The program holds a single
    bisection whatever the number of such rows: each copy would lengthen every compile.
    """
    few = min(_FEW_ROWS, weights.shape[0])

    def missing(carry: tuple[Array, Array]) -> Array:
        return ~jnp.all(carry[1])

    def fix(carry: tuple[Array, Array]) -> tuple[Array, Array]:
        cutoff, done = carry
        # The incomplete rows first; complete ones fill the rest of the `few` and keep theirs.
        _, idx = jax.lax.top_k((~done).astype(jnp.int32), few)
        exact = nucleus_threshold_exact(weights[idx], p)
        cutoff = cutoff.at[idx].set(jnp.where(done[idx], cutoff[idx], exact))
        return cutoff, done.at[idx].set(True)

    return jax.lax.while_loop(missing, fix, (cutoff, complete))[0]


def filter_logits(logits: Array, dist: Distribution, candidates: int = CANDIDATES) -> Array:
    """Tempered logits with the filtered-out tokens at -inf, float32 `[rows, vocab]`."""
    scaled = logits.astype(jnp.float32) / jnp.float32(dist.temperature)
    return jnp.where(kept_weights(logits, dist, candidates) > 0, scaled, NEG_INF)


def inverse_cdf(weights: Array, uniforms: Array) -> Array:
    """Draws one index per row of non-negative `weights [rows, vocab]`, int32 `[rows]`.

    `uniforms [rows]` in [0, 1). Picks the first index whose cumulative weight exceeds
    `u * total`, in vocabulary order: first a block of 128 tokens, then a token in it.
    An index with zero weight is never returned.
    """
    rows, vocab = weights.shape
    blocks = -(-vocab // _BLOCK)
    w = jnp.pad(weights, ((0, 0), (0, blocks * _BLOCK - vocab))).reshape(rows, blocks, _BLOCK)
    block_mass = jnp.sum(w, axis=-1)
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    target = uniforms.astype(jnp.float32) * block_cdf[:, -1]
    block = _first_above(block_cdf, target, block_mass > 0)
    inner = jnp.take_along_axis(w, block[:, None, None], axis=1)[:, 0]
    before = jnp.take_along_axis(block_cdf - block_mass, block[:, None], axis=1)[:, 0]
    token = _first_above(jnp.cumsum(inner, axis=-1), target - before, inner > 0)
    return (block * _BLOCK + token).astype(jnp.int32)


def _first_above(cdf: Array, target: Array, positive: Array) -> Array:
    """First index with `cdf > target` per row, clamped to the indices with positive mass."""
    index = jnp.sum((cdf <= target[:, None]).astype(jnp.int32), axis=-1)
    size = cdf.shape[-1]
    first = jnp.argmax(positive, axis=-1)
    last = size - 1 - jnp.argmax(jnp.flip(positive, axis=-1), axis=-1)
    return jnp.clip(index, first, last).astype(jnp.int32)


def next_tokens(logits: Array, keys: Array, dist: Distribution,
                candidates: int = CANDIDATES) -> Array:
    """The next token of each row, int32 `[rows]`, from logits `[rows, vocab]`.

    `keys [rows]`: one PRNG key per row (unused when greedy); each row draws one uniform.
    """
    if dist.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    uniforms = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys)
    return inverse_cdf(kept_weights(logits, dist, candidates), uniforms)
