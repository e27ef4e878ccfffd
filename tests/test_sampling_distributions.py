"""Temperature / top-k / top-p filtering and the draw, against an independent numpy model of
HF's logits warpers: exact kept sets, chi-square on token frequencies, greedy limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dice_jax.sampling.distributions import (
    Distribution,
    filter_logits,
    inverse_cdf,
    kept_weights,
    next_tokens,
    token_logprobs,
)


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float
                    ) -> np.ndarray:
    """HF's TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper, in float64."""
    scores = logits.astype(np.float64) / temperature
    if top_k > 0:
        kth = np.sort(scores)[::-1][min(top_k, scores.size) - 1]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1.0:
        order = np.argsort(scores, kind="stable")  # ascending, as HF sorts
        probs = np.exp(scores[order] - scores.max())
        probs /= probs.sum()
        remove = np.cumsum(probs) <= 1 - top_p
        remove[-1] = False  # min_tokens_to_keep=1
        scores = scores.copy()
        scores[order[remove]] = -np.inf
    p = np.exp(scores - scores.max())
    return p / p.sum()


LOGITS = np.array([2.0, 1.5, 1.2, 0.9, 0.4, 0.0, -0.3, -0.8, -1.5, -3.0], np.float32)
CASES = [  # (temperature, top_k, top_p, candidates)
    (1.0, 0, 1.0, 64),
    (0.7, 0, 1.0, 64),
    (1.3, 3, 1.0, 64),
    (0.9, 0, 0.8, 64),
    (1.1, 6, 0.7, 64),
    (0.9, 0, 0.8, 2),  # nucleus outgrows 2 candidates: the exact bisection path
]


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "candidates"), CASES)
def test_token_frequencies_match_reference(temperature, top_k, top_p, candidates):
    dist = Distribution(temperature, top_k, top_p)
    expected = reference_probs(LOGITS, temperature, top_k, top_p)
    draws = 20000
    rows = jnp.asarray(np.tile(LOGITS, (draws, 1)))
    keys = jax.random.split(jax.random.key(1234), draws)
    sample = jax.jit(lambda lg, k: next_tokens(lg, k, dist, candidates))
    counts = np.bincount(np.asarray(sample(rows, keys)), minlength=LOGITS.size)
    kept = expected > 0
    assert np.all(counts[~kept] == 0), (counts, expected)
    result = stats.chisquare(counts[kept], expected[kept] * draws)
    assert result.pvalue > 1e-3, (counts, expected * draws, result)


def test_kept_sets_match_reference_on_random_rows():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(64, 300)) * rng.uniform(0.5, 4, size=(64, 1))).astype(np.float32)
    for temperature, top_k, top_p in [(0.7, 0, 0.9), (1.0, 40, 0.95), (1.5, 0, 0.5),
                                      (0.8, 5, 1.0)]:
        dist = Distribution(temperature, top_k, top_p)
        for candidates in (64, 3):
            ours = np.isfinite(np.asarray(jax.jit(
                lambda lg, d=dist, c=candidates: filter_logits(lg, d, c))(logits)))
            ref = np.stack([reference_probs(row, temperature, top_k, top_p) > 0
                            for row in logits])
            np.testing.assert_array_equal(ours, ref)


def test_peaked_and_flat_rows_in_one_jitted_batch():
    """Regression: a one-token nucleus next to a row that needs the exact path must keep
    its token (a cut-off recomputed with other rounding once dropped it)."""
    rng = np.random.default_rng(1)
    peaked = np.full(4096, -20.0, np.float32)
    peaked[[7, 900]] = [30.0, 20.0]
    flat = rng.normal(size=4096).astype(np.float32)
    logits = jnp.asarray(np.stack([peaked] * 7 + [flat]))
    dist = Distribution(0.7, 0, 0.9)
    fn = jax.jit(lambda lg, k: (kept_weights(lg, dist), next_tokens(lg, k, dist)))
    for seed in range(5):
        weights, tokens = fn(logits, jax.random.split(jax.random.key(seed), 8))
        weights, tokens = np.asarray(weights), np.asarray(tokens)
        assert np.all(weights[np.arange(8), tokens] > 0)
        np.testing.assert_array_equal(tokens[:7], 7)
        assert (weights[:7] > 0).sum(-1).tolist() == [1] * 7


def test_tiny_temperature_equals_greedy():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(256, 500)).astype(np.float32) * 3)
    keys = jax.random.split(jax.random.key(0), 256)
    greedy = np.asarray(next_tokens(logits, keys, Distribution(0.0)))
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), -1))
    for dist in (Distribution(1e-4), Distribution(1e-4, 5, 0.9)):
        np.testing.assert_array_equal(np.asarray(next_tokens(logits, keys, dist)), greedy)


def test_inverse_cdf_never_draws_zero_weight():
    weights = np.zeros((6, 300), np.float32)
    weights[:, [0, 299]] = 0.0
    weights[:, 130] = 1.0
    weights[:, 257] = 3.0
    uniforms = jnp.asarray([0.0, 1e-9, 0.25, 0.2500001, 0.99999994, 0.6], jnp.float32)
    tokens = np.asarray(inverse_cdf(jnp.asarray(weights), uniforms))
    assert set(tokens.tolist()) <= {130, 257}
    assert tokens[0] == 130 and tokens[4] == 257


def test_token_logprobs_are_untempered_log_softmax():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 40)).astype(np.float32) * 4
    tokens = rng.integers(0, 40, 5)
    ref = logits[np.arange(5), tokens] - np.log(np.exp(logits.astype(np.float64)).sum(-1))
    ours = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
    # float32 log-softmax of logits ~+-10 against float64: a few roundoffs of ~10.
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_distribution_validates():
    with pytest.raises(ValueError, match="top_p"):
        Distribution(1.0, 0, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        Distribution(-1.0)
    with pytest.raises(ValueError, match="top_k"):
        Distribution(1.0, -2)
