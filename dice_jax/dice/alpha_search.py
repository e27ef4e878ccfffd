"""Eq. 9: `alpha* = argmin_alpha E_{(y_w, y_l) ~ D(alpha)} | |y_w| - |y_l| |`.

The objective is piecewise constant in alpha (pairs change only where two responses of a
prompt swap order), so it is searched as a black box, three ways:

- `grid`:   0, step, 2*step, ... stopped when the objective starts rising (official code);
- `random`: uniform draws over [alpha_min, alpha_max] (the paper's text);
- `gp`:     Gaussian-process minimisation, scikit-optimize `gp_minimize` (paper appendix).

Every search is seeded and returns the full (alpha, objective) trace for plots.
"""

import dataclasses

import numpy as np

from dice_jax.dice.rewards import length_gap_objective
from dice_jax.errors import ConfigError
from dice_jax.settings import check_settings, section, setting

METHODS = ("grid", "random", "gp")
OBJECTIVES = ("mean_abs", "abs_mean")


@section
class AlphaSearchConfig:
    """How alpha* is searched (the run config's `dice.search`)."""

    method: str = setting("random", "random (the paper's text) | grid (official code) | gp "
                          "(the appendix's scikit-optimize)", choices=METHODS)
    objective: str = setting("mean_abs", "mean_abs: Eq. 9, E|gap| | abs_mean: the official "
                             "|E gap|", choices=OBJECTIVES)
    alpha_min: float = setting(0.0, "lower end of the alpha range", min=0)
    alpha_max: float | None = setting(None, "upper end (None: auto_alpha_max)", above=0)
    grid_step: float | None = setting(None, "grid step (None: 1/1000 of the range)",
                                      above=0)
    num_trials: int = setting(64, "objective evaluations (random / gp)", min=1)
    seed: int = setting(0, "random / gp seed", managed="config.seed (each round derives "
                        "its own)")

    def __post_init__(self) -> None:
        check_settings(self, "dice.search.")

    def check(self) -> None:
        if self.alpha_max is not None and self.alpha_max <= self.alpha_min:
            raise ConfigError(f"config.dice.search.alpha_max: {self.alpha_max} must exceed "
                              f"alpha_min={self.alpha_min}")


@dataclasses.dataclass(frozen=True)
class AlphaSearchResult:
    alpha: float
    objective: float
    trace: tuple[tuple[float, float], ...]  # (alpha, objective) in evaluation order
    method: str


def auto_alpha_max(reward: np.ndarray, lengths: np.ndarray, valid: np.ndarray,
                   quantile: float = 0.95) -> float:
    """An upper end for the search: a high quantile of the alphas at which two valid
    responses of one prompt swap order, `|r_i - r_j| / ||y_i| - |y_j||`.

    Past the largest such alpha every prompt is ordered by length alone and the objective
    is constant; the quantile ignores a few outlier pairs of near-equal length.
    """
    r = np.asarray(reward, np.float64)
    n = np.asarray(lengths, np.float64)
    ok = np.asarray(valid, bool)
    dr = np.abs(r[:, :, None] - r[:, None, :])
    dn = np.abs(n[:, :, None] - n[:, None, :])
    both = ok[:, :, None] & ok[:, None, :] & (dn > 0)
    breaks = dr[both] / dn[both]
    breaks = breaks[breaks > 0]
    return float(np.quantile(breaks, quantile)) if breaks.size else 1.0


def search_alpha(reward: np.ndarray, lengths: np.ndarray, valid: np.ndarray,
                 config: AlphaSearchConfig) -> AlphaSearchResult:
    """Finds alpha* for `reward`, `lengths`, `valid` (all `[P, K]`) per `config`."""
    lo = config.alpha_min
    hi = config.alpha_max if config.alpha_max is not None else max(
        auto_alpha_max(reward, lengths, valid), lo + 1e-12)
    trace: list[tuple[float, float]] = []

    def objective(alpha: float) -> float:
        value = float(length_gap_objective(np.float32(alpha), reward, lengths, valid,
                                           objective=config.objective))
        trace.append((float(alpha), value))
        return value

    if config.method == "grid":
        step = config.grid_step or (hi - lo) / 1000
        best = objective(lo)
        k = 1
        while lo + k * step <= hi * (1 + 1e-9):
            value = objective(lo + k * step)
            if value > best:  # the objective starts rising: stop, as the official code does
                break
            best = value
            k += 1
    elif config.method == "random":
        rng = np.random.default_rng(config.seed)
        objective(lo)  # alpha_min (no shaping by default) is always a candidate
        for alpha in rng.uniform(lo, hi, size=config.num_trials - 1):
            objective(float(alpha))
    else:
        _gp_search(objective, lo, hi, config)
    finite = [(a, v) for a, v in trace if np.isfinite(v)]
    if not finite:
        raise ValueError("no alpha gives a single preference pair: every prompt has fewer "
                         "than two valid responses or all rewards tie")
    # Lowest objective; among equals the smallest alpha (the least shaping).
    alpha, value = min(finite, key=lambda t: (t[1], t[0]))
    return AlphaSearchResult(alpha, value, tuple(trace), config.method)


def _gp_search(objective, lo: float, hi: float, config: AlphaSearchConfig) -> None:
    from skopt import gp_minimize
    from skopt.space import Space
    from skopt.utils import cook_estimator

    scale = hi - lo
    seen: list[float] = []

    def finite_objective(x: list[float]) -> float:
        value = objective(lo + x[0] * scale)
        seen.append(value)
        finite = [v for v in seen if np.isfinite(v)]
        # A GP cannot model +inf ("no pair"): stand in twice the worst finite value.
        return value if np.isfinite(value) else 2 * max(finite, default=1.0) + 1.0

    calls = max(config.num_trials, 3)
    # One dimension: sampling the acquisition on 2,000 points is exact enough, and one
    # kernel fit per call (no restarts) keeps the GP's own cost to a fraction of a second.
    estimator = cook_estimator("GP", Space([(0.0, 1.0)]), random_state=config.seed,
                               noise="gaussian", n_restarts_optimizer=0)
    gp_minimize(finite_objective, [(0.0, 1.0)], base_estimator=estimator, n_calls=calls,
                x0=[[0.0]],
                n_initial_points=min(8, calls - 1), acq_optimizer="sampling", n_points=2000,
                random_state=config.seed)
