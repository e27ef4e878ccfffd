"""The DPO loss family against independent numpy formulas; beta applied exactly once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dice_jax.training import losses as L


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def random_logps(seed=0, n=64):
    rng = np.random.default_rng(seed)
    pw, pl = rng.normal(-40, 15, n), rng.normal(-45, 15, n)
    rw, rl = pw + rng.normal(0, 3, n), pl + rng.normal(0, 3, n)
    return [a.astype(np.float32) for a in (pw, pl, rw, rl)]


def ratios(pw, pl, rw, rl):
    return (pw.astype(np.float64) - rw, pl.astype(np.float64) - rl)


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_sigmoid_matches_numpy(beta, eps):
    pw, pl, rw, rl = random_logps(1)
    cw, cl = ratios(pw, pl, rw, rl)
    h = cw - cl
    expected = -(1 - eps) * np_log_sigmoid(beta * h) - eps * np_log_sigmoid(-beta * h)
    # float32 (ours) against float64 (numpy) on O(1) losses: a few roundoffs of 6e-8 each.
    got = L.sigmoid_loss(jnp.asarray(cw, jnp.float32), jnp.asarray(cl, jnp.float32), beta, eps)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)


def test_ipo_matches_numpy_on_length_averaged_logps():
    pw, pl, rw, rl = random_logps(2)
    counts = np.random.default_rng(2).integers(1, 50, (64, 2))
    beta = 0.1
    # IPO: log-ratios of length-AVERAGED log-probs (average over response tokens).
    aw = (pw.astype(np.float64) - rw) / counts[:, 0]
    al = (pl.astype(np.float64) - rl) / counts[:, 1]
    expected = (aw - al - 1 / (2 * beta)) ** 2
    c = jnp.asarray(counts)
    avg = lambda x, k: L.pair_logps(jnp.asarray(x), c[:, k], "ipo")  # noqa: E731
    losses, _ = L.dpo_loss(avg(pw, 0), avg(pl, 1), avg(rw, 0), avg(rl, 1), loss_type="ipo",
                           beta=beta)
    # IPO squares a float32 length-averaged margin: its relative error doubles, ~1e-6.
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-5, atol=1e-6)
    # Other losses use the sums.
    np.testing.assert_array_equal(np.asarray(L.pair_logps(jnp.asarray(pw), c[:, 0], "sigmoid")),
                                  pw)


def test_hinge_matches_numpy():
    pw, pl, rw, rl = random_logps(3)
    cw, cl = ratios(pw, pl, rw, rl)
    beta = 0.3
    expected = np.maximum(0.0, 1 - beta * (cw - cl))
    # float32 against float64 on O(1) values: a few roundoffs of 6e-8.
    got = L.hinge_loss(jnp.asarray(cw, jnp.float32), jnp.asarray(cl, jnp.float32), beta)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)
    assert (expected == 0).any() and (expected > 0).any()  # both branches exercised


@pytest.mark.parametrize("shift", [0.0, 5.0])
def test_kto_pair_matches_numpy(shift):
    pw, pl, rw, rl = random_logps(4)
    cw, cl = ratios(pw, pl, rw, rl)
    cw, cl = cw + shift, cl + shift  # shift > 0: the KL estimates are positive (no clamp)
    beta = 0.1
    kl_w, kl_l = max(cw.mean(), 0.0), max(cl.mean(), 0.0)
    expected = 0.5 * ((1 - np_sigmoid(beta * (cw - kl_l))) + (1 - np_sigmoid(beta * (kl_w - cl))))
    # float32 against float64 on O(1) values (losses and their mean): a few roundoffs.
    got = L.kto_pair_loss(jnp.asarray(cw, jnp.float32), jnp.asarray(cl, jnp.float32), beta)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)
    # TRL averages over the 2P concatenated terms: same batch mean.
    trl = np.concatenate([1 - np_sigmoid(beta * (cw - kl_l)), 1 - np_sigmoid(beta * (kl_w - cl))])
    np.testing.assert_allclose(float(jnp.mean(got)), trl.mean(), rtol=1e-6)


def test_kto_pair_baseline_is_not_differentiated():
    pw, pl, rw, rl = random_logps(5)
    cw, cl = (x + 5.0 for x in ratios(pw, pl, rw, rl))
    beta = 0.1
    kl_l = cl.mean()
    grad = jax.grad(lambda c: jnp.sum(L.kto_pair_loss(c, jnp.asarray(cl, jnp.float32), beta)))(
        jnp.asarray(cw, jnp.float32))
    s = np_sigmoid(beta * (cw - kl_l))
    # d/dc_i of 0.5 (1 - s_i), the baseline held constant (its own term has no c_i).
    # A float32 gradient through a sigmoid against float64: ~10 roundoffs relative.
    np.testing.assert_allclose(np.asarray(grad), -0.5 * beta * s * (1 - s), rtol=1e-5,
                               atol=1e-7)


def test_beta_applied_exactly_once():
    """Regression: MaxText's old DPO scaled by beta twice (inside and outside the sigmoid)."""
    beta = 0.1
    pw, pl = jnp.asarray([-10.0]), jnp.asarray([-20.0])
    rw, rl = jnp.asarray([-12.0]), jnp.asarray([-15.0])
    h = (-10.0 + 12.0) - (-20.0 + 15.0)  # = 7
    losses, m = L.dpo_loss(pw, pl, rw, rl, loss_type="sigmoid", beta=beta)
    # float32 on inputs ~10-20 (exact) and O(1) outputs: within a few 6e-8 roundoffs.
    assert float(losses[0]) == pytest.approx(-np_log_sigmoid(beta * h), abs=1e-6)
    assert abs(float(losses[0]) + np_log_sigmoid(beta * beta * h)) > 0.1
    assert float(m["rewards/chosen"][0]) == pytest.approx(beta * 2.0, abs=1e-6)
    assert float(m["rewards/rejected"][0]) == pytest.approx(beta * -5.0, abs=1e-6)
    assert float(m["rewards/margins"][0]) == pytest.approx(beta * h, abs=1e-6)
    # dL/dlogpi_w = -beta * sigmoid(-beta h): one factor of beta, not two.
    g = jax.grad(lambda x: L.dpo_loss(x, pl, rw, rl, loss_type="sigmoid", beta=beta)[0][0])(pw)
    # A float32 gradient against float64: ~10 roundoffs relative.
    assert float(g[0]) == pytest.approx(-beta * np_sigmoid(-beta * h), rel=1e-5)
    for loss_type, expected in [("hinge", max(0.0, 1 - beta * h)),
                                ("ipo", (h - 1 / (2 * beta)) ** 2)]:
        got = L.dpo_loss(pw, pl, rw, rl, loss_type=loss_type, beta=beta)[0]
        # float32 against float64 on values ~0.3-20: a few roundoffs (6e-8) relative.
        assert float(got[0]) == pytest.approx(expected, rel=1e-6)


def test_metrics_use_trl_names_and_unknown_loss_fails():
    pw, pl, rw, rl = (jnp.asarray(x) for x in random_logps(6, 8))
    _, m = L.dpo_loss(pw, pl, rw, rl, loss_type="sigmoid", beta=0.1)
    assert set(m) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                      "rewards/accuracies", "logps/chosen", "logps/rejected"}
    np.testing.assert_array_equal(np.asarray(m["rewards/accuracies"]),
                                  (np.asarray(m["rewards/margins"]) > 0).astype(np.float32))
    with pytest.raises(ValueError, match="unknown loss_type"):
        L.dpo_loss(pw, pl, rw, rl, loss_type="robust", beta=0.1)
