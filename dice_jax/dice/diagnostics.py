"""Is the implicit reward any good? Per-round figures and the guard that acts on them.

DICE labels its own samples with Eq. 4's reward `r = beta * log(pi_theta(t-1) / pi_ref(t-1))`
and trains on the result, so a reward that no longer ranks responses well poisons every
later round. Before round t's D_t is built the data stage measures:

- `heldout_accuracy`: on preference pairs no round trains on (D_offline's held-out split),
  the fraction with `r(x, y_w) > r(x, y_l)` under the very models that label round t,
  and the mean margin `r(x, y_w) - r(x, y_l)`;
- `rank_agreement`: where the prompts carry a verifiable judge, Kendall's tau-b between
  the reward and the judge's gold score over each prompt's valid samples, averaged over
  the prompts where both vary;
- `pair_agreement`: of the round's (chosen, rejected) pairs, the fractions the judge
  scores higher / lower / equal for the chosen response;
- `length_correlation`: Pearson's correlation of a reward with the response length,
  within prompts (each prompt's valid samples centred on their mean, since pairs are
  drawn within a prompt), for the raw reward and for Eq. 8's shaped one at alpha*.

`GuardConfig` (the run config's `dice.guard`) stops a round whose held-out accuracy is
below a threshold, or trains it on D_offline instead.
"""


from typing import Any

import numpy as np
from scipy.stats import kendalltau

from dice_jax.settings import check_settings, section, setting

GUARD_ACTIONS = ("stop", "offline")


@section
class GuardConfig:
    """What a round does when its reward fails the held-out check (`dice.guard`)."""

    min_heldout_accuracy: float = setting(
        0.5, "a round whose implicit reward ranks fewer held-out pairs correctly than this "
        "does not train on self-labelled data (0 disables)", min=0, max=1)
    action: str = setting("stop", "below the threshold: stop (exit code 2; resume with the "
                          "guard lowered) | offline (train the round on D_offline only)",
                          choices=GUARD_ACTIONS)

    def __post_init__(self) -> None:
        check_settings(self, "dice.guard.")

    def tripped(self, accuracy: float | None) -> bool:
        """Whether `accuracy` (None: not measured) is below the threshold."""
        return accuracy is not None and accuracy < self.min_heldout_accuracy


def heldout_accuracy(logp_policy: np.ndarray, logp_reference: np.ndarray, scale: float
                     ) -> dict[str, float | int]:
    """Eq. 4 on held-out pairs: accuracy and mean margin of the implicit reward.

    `logp_policy`, `logp_reference`: summed response log-probs `[H, 2]` float (column 0
    the chosen response, 1 the rejected). A tie counts as wrong. Returns `accuracy`,
    `margin` (mean of `r_w - r_l`) and `pairs` (H).
    """
    ratio = (np.asarray(logp_policy, np.float64) - np.asarray(logp_reference, np.float64))
    margin = scale * (ratio[:, 0] - ratio[:, 1])
    return {"accuracy": float(np.mean(margin > 0)), "margin": float(np.mean(margin)),
            "pairs": int(margin.size)}


def rank_agreement(reward: np.ndarray, gold: np.ndarray, valid: np.ndarray
                   ) -> dict[str, float | int | None]:
    """Per-prompt Kendall tau-b between `reward [P, K]` and `gold [P, K]` over the valid
    samples (`valid [P, K]` bool), averaged over prompts where both vary.

    Returns `kendall_tau` (None when no prompt qualifies) and `prompts` (how many did).
    """
    taus = []
    for r, g, ok in zip(np.asarray(reward), np.asarray(gold), np.asarray(valid, bool),
                        strict=True):
        if ok.sum() < 2 or np.ptp(r[ok]) == 0 or np.ptp(g[ok]) == 0:
            continue  # tau is undefined when either ranking is one tie
        taus.append(float(kendalltau(r[ok], g[ok]).statistic))
    return {"kendall_tau": float(np.mean(taus)) if taus else None, "prompts": len(taus)}


def pair_agreement(gold: np.ndarray, chosen: np.ndarray, rejected: np.ndarray,
                   is_pair: np.ndarray) -> dict[str, float | int | None]:
    """How the judge sees the round's pairs: fractions with gold(chosen) above, below and
    equal to gold(rejected). `gold [P, K]`; `chosen`, `rejected [P]` int; `is_pair [P]`."""
    idx = np.flatnonzero(np.asarray(is_pair, bool))
    if idx.size == 0:
        return {"agree": None, "disagree": None, "tie": None, "pairs": 0}
    diff = gold[idx, np.asarray(chosen)[idx]] - gold[idx, np.asarray(rejected)[idx]]
    return {"agree": float(np.mean(diff > 0)), "disagree": float(np.mean(diff < 0)),
            "tie": float(np.mean(diff == 0)), "pairs": int(idx.size)}


def length_correlation(reward: np.ndarray, lengths: np.ndarray, valid: np.ndarray
                       ) -> float | None:
    """Pearson correlation of `reward [P, K]` with `lengths [P, K]` within prompts: each
    prompt's valid samples are centred on their own means, then pooled. None when there
    is no variation to correlate."""
    valid = np.asarray(valid, bool)
    count = np.maximum(valid.sum(-1, keepdims=True), 1)

    def centred(x: np.ndarray) -> np.ndarray:
        x = np.where(valid, np.asarray(x, np.float64), 0.0)
        return np.where(valid, x - x.sum(-1, keepdims=True) / count, 0.0)

    r, n = centred(reward), centred(lengths)
    denominator = np.sqrt(np.sum(r * r) * np.sum(n * n))
    return float(np.sum(r * n) / denominator) if denominator > 0 else None


def round_diagnostics(reward: np.ndarray, shaped: np.ndarray, lengths: np.ndarray,
                      valid: np.ndarray, pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
                      gold: np.ndarray | None) -> dict[str, Any]:
    """The figures of a round's own samples (the held-out ones come from the score
    stage): length correlation before and after shaping, and with gold scores `[P, K]`
    (NaN where a prompt has no judge) the judge's rank and pair agreement."""
    out: dict[str, Any] = {"length_correlation_raw": length_correlation(reward, lengths, valid),
                           "length_correlation_shaped": length_correlation(shaped, lengths,
                                                                           valid)}
    if gold is not None:
        judged = np.asarray(valid, bool) & np.isfinite(gold)
        chosen, rejected, is_pair = pairs
        out["judge_rank_agreement"] = rank_agreement(reward, np.nan_to_num(gold), judged)
        both = np.asarray(is_pair, bool) & np.isfinite(gold).all(-1)
        out["judge_pair_agreement"] = pair_agreement(np.nan_to_num(gold), chosen, rejected,
                                                     both)
    return out
