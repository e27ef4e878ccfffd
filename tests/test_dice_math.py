"""DICE equations, pair selection and the alpha* search against numpy / brute force."""

import itertools

import numpy as np
import pytest

from dice_jax.dice.alpha_search import AlphaSearchConfig, auto_alpha_max, search_alpha
from dice_jax.dice.rewards import (
    implicit_reward,
    length_gap_objective,
    length_regularized_reward,
    select_pairs,
)


def test_implicit_reward_scaled_and_unscaled():
    rng = np.random.default_rng(0)
    pi, ref = rng.normal(size=(5, 4)) * 30, rng.normal(size=(5, 4)) * 30
    # implicit_reward casts to float32 (inputs ~30 round by ~1e-6): a few 1e-7 relative on
    # differences of this size; 1e-5 keeps margin where pi - ref is small.
    np.testing.assert_allclose(implicit_reward(pi, ref, 0.1), 0.1 * (pi - ref), rtol=1e-5)
    np.testing.assert_allclose(implicit_reward(pi, ref, 0.1, scaled=False), pi - ref, rtol=1e-5)


def test_length_regularized_reward():
    r = np.array([[1.0, 2.0, 3.0]])
    n = np.array([[10, 20, 40]])
    # float32 of 0.05 * n: default rtol 1e-7 is ~1 float32 roundoff of these values.
    np.testing.assert_allclose(length_regularized_reward(r, n, 0.05), [[0.5, 1.0, 1.0]])


def test_pair_selection_by_hand():
    r = np.array([[0.1, 0.9, -0.3, 0.2],    # chosen 1, rejected 2
                  [0.5, 0.5, 0.5, 0.5],     # all tie: no pair
                  [0.2, 0.7, 0.7, -1.0],    # tie for best: lowest index (1) wins
                  [0.3, 5.0, 0.1, -9.0],    # 1 and 3 invalid: chosen 0, rejected 2
                  [0.3, 5.0, 0.1, -9.0]])   # one valid response: no pair
    valid = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 0], [1, 0, 0, 0]])
    chosen, rejected, is_pair = map(np.asarray, select_pairs(r, valid))
    assert is_pair.tolist() == [True, False, True, True, False]
    assert chosen[[0, 2, 3]].tolist() == [1, 1, 0]
    assert rejected[[0, 2, 3]].tolist() == [2, 3, 2]


def _numpy_objective(alpha, r, n, valid, kind):
    gaps = []
    for i in range(r.shape[0]):
        idx = np.flatnonzero(valid[i])
        if len(idx) < 2:
            continue
        s = r[i, idx] - alpha * n[i, idx]
        if s.max() <= s.min():
            continue
        w, lo = idx[np.argmax(s)], idx[np.argmin(s)]
        gaps.append(n[i, w] - n[i, lo])
    if not gaps:
        return np.inf
    gaps = np.asarray(gaps, float)
    return np.mean(np.abs(gaps)) if kind == "mean_abs" else abs(np.mean(gaps))


def _synthetic(seed, prompts=60, k=8, bias=0.02, noise=10.0):
    """Rewards = quality + bias * length: shaping with alpha near `bias` undoes the bias."""
    rng = np.random.default_rng(seed)
    n = rng.integers(50, 1500, size=(prompts, k)).astype(np.float64)
    r = noise * rng.normal(size=(prompts, k)) + bias * n
    valid = rng.random((prompts, k)) > 0.1
    return r.astype(np.float32), n.astype(np.float32), valid


@pytest.mark.parametrize("kind", ["mean_abs", "abs_mean"])
def test_objective_matches_numpy(kind):
    r, n, valid = _synthetic(1)
    for alpha in [0.0, 0.005, 0.02, 0.1]:
        ours = float(length_gap_objective(np.float32(alpha), r, n, valid, objective=kind))
        # Ours sums 60 prompts' gaps in float32 (JAX), numpy in float64: 60 * 6e-8 < 1e-5 rel.
        assert ours == pytest.approx(_numpy_objective(np.float32(alpha), r, n, valid, kind),
                                     rel=1e-5)


def _brute_force_minimum(r, n, valid, kind, hi):
    """The exact minimum: the objective only changes at swap points, so evaluate every
    interval between consecutive swap points (and 0)."""
    r64, n64 = r.astype(np.float64), n.astype(np.float64)
    points = {0.0}
    for i in range(r.shape[0]):
        for a in np.flatnonzero(valid[i]):
            for b in np.flatnonzero(valid[i]):
                if n64[i, a] != n64[i, b]:
                    x = (r64[i, a] - r64[i, b]) / (n64[i, a] - n64[i, b])
                    if 0 < x < hi:
                        points.add(x)
    pts = np.sort(np.array(sorted(points)))
    candidates = np.concatenate([[0.0], (pts[:-1] + pts[1:]) / 2, [pts[-1] * 1.0001]])
    values = [_numpy_objective(np.float32(a), r, n, valid, kind) for a in candidates]
    best = int(np.argmin(values))
    return candidates[best], values[best]


@pytest.mark.parametrize("method", ["grid", "random", "gp"])
def test_search_finds_brute_force_minimum(method):
    r, n, valid = _synthetic(2)
    kind = "abs_mean"
    config = AlphaSearchConfig(method=method, objective=kind, alpha_max=0.05,
                               grid_step=0.0005, num_trials=200 if method == "random" else 40,
                               seed=3)
    result = search_alpha(r, n, valid, config)
    best_alpha, best_value = _brute_force_minimum(r, n, valid, kind, 0.05)
    at_zero = _numpy_objective(0.0, r, n, valid, kind)
    # The planted length bias: alpha = 0 leaves a big gap, the optimum sits near the bias.
    # The planted bias is 0.02 with noise 10 on lengths 50-1500: the optimum lies within
    # a quarter of it (0.005); the gap at alpha 0 (~0.02 * 1000) is far above 500 / 20.
    assert at_zero > 500 and best_value < 20 and abs(best_alpha - 0.02) < 0.005
    assert at_zero - result.objective >= 0.9 * (at_zero - best_value)
    # Three grid steps (0.0005) of the coarsest search: each method may stop on a
    # neighbouring point of the flat minimum.
    assert abs(result.alpha - best_alpha) < 0.0015
    # float32 (JAX) against float64 (numpy) sums over 60 prompts: < 1e-5 relative.
    assert result.objective == pytest.approx(
        _numpy_objective(np.float32(result.alpha), r, n, valid, kind), rel=1e-5)
    assert search_alpha(r, n, valid, config) == result  # seeded: repeats exactly


def test_grid_stops_when_objective_rises():
    r, n, valid = _synthetic(4)
    config = AlphaSearchConfig(method="grid", objective="abs_mean", alpha_max=1.0,
                               grid_step=0.001)
    result = search_alpha(r, n, valid, config)
    values = [v for _, v in result.trace]
    assert values[-1] > values[-2]  # stopped on the first rise ...
    assert all(b <= a for a, b in itertools.pairwise(values[:-1]))  # ... not before
    assert len(result.trace) < 1000


def test_random_search_includes_alpha_min_and_is_seeded():
    r, n, valid = _synthetic(5)
    a = search_alpha(r, n, valid, AlphaSearchConfig(method="random", num_trials=16, seed=1))
    b = search_alpha(r, n, valid, AlphaSearchConfig(method="random", num_trials=16, seed=2))
    assert a.trace[0][0] == 0.0 and len(a.trace) == 16
    assert a.trace != b.trace


def test_auto_alpha_max_bounds_the_interesting_range():
    r, n, valid = _synthetic(6)
    hi = auto_alpha_max(r, n, valid)
    assert hi > 0.02  # the planted bias lies inside the searched range


def test_search_errors():
    with pytest.raises(ValueError, match="method"):
        AlphaSearchConfig(method="bayes")
    with pytest.raises(ValueError, match="objective"):
        AlphaSearchConfig(objective="median")
    r = np.zeros((3, 4), np.float32)
    n = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="no alpha gives a single preference pair"):
        search_alpha(r, n, np.ones((3, 4), bool), AlphaSearchConfig(num_trials=4))
