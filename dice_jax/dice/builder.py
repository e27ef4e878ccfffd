"""Algorithm 1, lines 3-5: scored samples -> D(alpha*) -> D_t, with counts and statistics.

Input is a `ScoredSamples` (K responses per prompt with both models' sequence log-probs);
output a `RoundData` holding every sample's reward, the pairs of D(alpha*), the replay mix
D_t and a JSON-ready `stats` dict. Writing files is `dice_jax.dice.artifacts`' job.

Defaults follow the paper's text where it is explicit (rewards scaled by beta, Eq. 9's mean
absolute gap, random search) and the official code where the paper is silent (filters,
replay sizes, character lengths); each is a config field.
"""

import dataclasses
from collections import Counter
from typing import Any

import numpy as np

from dice_jax.data import normalise_row
from dice_jax.dice.alpha_search import AlphaSearchConfig, AlphaSearchResult, search_alpha
from dice_jax.dice.diagnostics import GuardConfig, round_diagnostics
from dice_jax.dice.filters import FilterConfig, valid_responses
from dice_jax.dice.replay import mix_replay
from dice_jax.dice.rewards import (
    implicit_reward,
    length_gap_objective,
    length_regularized_reward,
    mean_length_gap,
    select_pairs,
)
from dice_jax.errors import ConfigError, DiceError
from dice_jax.settings import check_settings, section, setting


@section
class DiceDataConfig:
    """The DICE round's settings (the run config's `dice` section): scoring, rewards,
    filters, alpha* search and replay."""

    beta: float = setting(0.1, "Eq. 4's beta", above=0, managed="train.beta (one beta for "
                          "the loss and the reward)")
    reward_scale: str = setting("beta", "factor on log(pi/pi_ref) in Eq. 4: beta (as "
                                "written) | none (the official code: 1) | a number")
    length_unit: str = setting("chars", "|y| in Eq. 8 and 9: chars (paper, official) | "
                               "tokens", choices=("chars", "tokens"))
    gamma: float = setting(0.5, "replay: fraction of D_t drawn from D_offline", min=0,
                           max=1)
    reuse_sampler_logps: bool = setting(True, "log pi from the sampler instead of a second "
                                        "forward (tests show they are equal)")
    score_batch_size: int = setting(32, "sequences per reference forward", min=1)
    judge_max_new_tokens: int = setting(256, "llm_judge baseline: tokens per rating", min=1)
    seed: int = setting(0, "search and replay seed", managed="config.seed (each round "
                        "derives its own)")
    filters: FilterConfig = setting(factory=FilterConfig, help="which samples may pair")
    search: AlphaSearchConfig = setting(factory=AlphaSearchConfig, help="alpha* search")
    guard: GuardConfig = setting(factory=GuardConfig, help="held-out check of the reward")

    def __post_init__(self) -> None:
        check_settings(self, "dice.")

    def check(self) -> None:
        _ = self.scale

    @property
    def scale(self) -> float:
        """The factor on `log pi - log pi_ref` in Eq. 4."""
        if self.reward_scale == "beta":
            return self.beta
        if self.reward_scale == "none":
            return 1.0
        try:
            value = float(self.reward_scale)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ConfigError(f"config.dice.reward_scale: {self.reward_scale!r} is not 'beta', "
                              "'none' or a positive number")
        return value


@dataclasses.dataclass
class ScoredSamples:
    """K responses for each of P prompts, with sequence log-probs under both models."""

    prompts: list[str]
    responses: list[list[str]]          # [P][K]
    token_counts: np.ndarray            # [P, K] int, response tokens incl. end-of-turn
    finish_reasons: list[list[str]]     # [P][K] "stop" | "length"
    logp_policy: np.ndarray             # [P, K] float
    logp_reference: np.ndarray          # [P, K] float

    def validate(self) -> None:
        p = len(self.prompts)
        k = len(self.responses[0]) if self.responses else 0
        if p == 0:
            raise DiceError("no prompts were sampled")
        if k < 2:
            raise DiceError(f"K={k} responses per prompt; a pair needs at least 2")
        for i, row in enumerate(self.responses):
            if len(row) != k or len(self.finish_reasons[i]) != k:
                raise DiceError(f"prompt {i}: {len(row)} responses, expected K={k}")
        for name in ("token_counts", "logp_policy", "logp_reference"):
            shape = np.shape(getattr(self, name))
            if shape != (p, k):
                raise DiceError(f"samples.{name} has shape {shape}, expected {(p, k)}")


@dataclasses.dataclass
class RoundData:
    samples: list[dict[str, Any]]       # one row per (prompt, response) with its reward
    pairs: list[dict[str, Any]]         # D(alpha*)
    mixed: list[dict[str, Any]]         # D_t
    search: AlphaSearchResult
    stats: dict[str, Any]
    gaps_before: np.ndarray             # |y_w| - |y_l| per pair at alpha = 0
    gaps_after: np.ndarray              # ... at alpha*
    reward: np.ndarray                  # [P, K] Eq. 4 (0 where non-finite)
    lengths: np.ndarray                 # [P, K] in config.length_unit
    valid: np.ndarray                   # [P, K] survived the filters


def _pair_gaps(lengths, chosen, rejected, is_pair) -> np.ndarray:
    c, r, ok = np.asarray(chosen), np.asarray(rejected), np.asarray(is_pair)
    idx = np.flatnonzero(ok)
    return lengths[idx, c[idx]] - lengths[idx, r[idx]]


def build_round_data(samples: ScoredSamples, offline: list[dict[str, Any]],
                     config: DiceDataConfig, judge_scores: np.ndarray | None = None,
                     judge_drops: Counter | None = None,
                     gold_scores: np.ndarray | None = None) -> RoundData:
    """Rewards (Eq. 4), filters, alpha* (Eq. 9), D(alpha*) (Eq. 8 pairs), replay mix.

    With `judge_scores [P, K]` (the LLM-as-a-judge baseline) those scores replace the
    implicit reward and alpha is fixed at 0: no length shaping. NaN scores (unparseable
    judgements) are dropped and counted. `gold_scores [P, K]` (a verifiable judge's, NaN
    where a prompt has none) only feed `stats["reward_health"]`.
    """
    samples.validate()
    if judge_scores is None:
        reward = np.asarray(implicit_reward(samples.logp_policy, samples.logp_reference,
                                            config.scale))
    else:
        reward = np.asarray(judge_scores, np.float32)
    char_lengths = np.array([[len(r) for r in row] for row in samples.responses], np.int64)
    lengths = (char_lengths if config.length_unit == "chars"
               else np.asarray(samples.token_counts, np.int64)).astype(np.float32)
    valid, _, drops = valid_responses(samples.finish_reasons, char_lengths, config.filters)
    # The judge counts unparseable judgement texts; responses without a score are counted
    # here, once each, among those the filters kept (a response has one drop reason).
    drops.update({k: v for k, v in (judge_drops or {}).items() if k != "unparseable_score"})
    finite = np.isfinite(reward)
    drops["unparseable_score" if judge_scores is not None else "non_finite_reward"] += int(
        np.sum(valid & ~finite))
    if judge_scores is not None and not finite.any():
        raise DiceError(f"the LLM judge wrote no parseable 'Score: N' (0-5) for any of the "
                        f"{reward.size} responses (drops: {dict(drops)}); the policy cannot "
                        "act as its own judge here (a larger model, or more "
                        "dice.judge_max_new_tokens)")
    valid &= finite
    reward = np.where(finite, reward, 0.0).astype(np.float32)
    if not valid.any():
        raise DiceError(f"every response was filtered out (drops: {dict(drops)}); nothing "
                        "to pair. Loosen dice.filters or sample more tokens")
    if judge_scores is None:
        search = search_alpha(reward, lengths, valid,
                              dataclasses.replace(config.search, seed=config.seed))
    else:
        at_zero = float(length_gap_objective(np.float32(0.0), reward, lengths, valid,
                                             objective=config.search.objective))
        search = AlphaSearchResult(0.0, at_zero, ((0.0, at_zero),), "none (llm_judge)")
    shaped = np.asarray(length_regularized_reward(reward, lengths, np.float32(search.alpha)))
    chosen, rejected, is_pair = (np.asarray(a) for a in select_pairs(shaped, valid))
    unshaped = select_pairs(reward, valid)
    drops["tied_prompts"] += int(np.sum((valid.sum(-1) >= 2) & ~is_pair))
    if not is_pair.any():
        raise DiceError(f"no prompt yields a pair (drops: {dict(drops)})")
    pairs = []
    for i in np.flatnonzero(is_pair):
        w, lo = int(chosen[i]), int(rejected[i])
        pairs.append({
            "prompt": samples.prompts[i], "chosen": samples.responses[i][w],
            "rejected": samples.responses[i][lo], "prompt_index": int(i),
            "chosen_index": w, "rejected_index": lo,
            "chosen_reward": float(reward[i, w]), "rejected_reward": float(reward[i, lo]),
            "chosen_length": int(lengths[i, w]), "rejected_length": int(lengths[i, lo]),
        })
    mix = mix_replay(pairs, [normalise_row(row, j) for j, row in enumerate(offline)],
                     config.gamma, config.seed)
    mixed = [_uniform_row(row) for row in mix.rows]
    rows = [{"prompt_index": i, "sample_index": k, "prompt": samples.prompts[i],
             "response": samples.responses[i][k], "finish_reason": samples.finish_reasons[i][k],
             "num_tokens": int(samples.token_counts[i, k]), "num_chars": int(char_lengths[i, k]),
             "logp_policy": float(samples.logp_policy[i, k]),
             "logp_reference": float(samples.logp_reference[i, k]),
             "reward": float(reward[i, k]), "shaped_reward": float(shaped[i, k]),
             "valid": bool(valid[i, k])}
            for i in range(len(samples.prompts)) for k in range(len(samples.responses[i]))]
    before = _pair_gaps(lengths, *unshaped)
    after = _pair_gaps(lengths, chosen, rejected, is_pair)
    stats = {
        "num_prompts": len(samples.prompts), "k": len(samples.responses[0]),
        "num_valid_responses": int(valid.sum()), "num_pairs": len(pairs),
        "drops": dict(sorted(Counter(drops).items())),
        "alpha_star": search.alpha, "alpha_objective": search.objective,
        "alpha_search": {"method": search.method, "objective": config.search.objective,
                         "num_evaluations": len(search.trace)},
        "reward_scale": config.reward_scale, "length_unit": config.length_unit,
        "mean_length_gap_before": float(mean_length_gap(lengths, *unshaped)),
        "mean_length_gap_after": float(mean_length_gap(lengths, chosen, rejected, is_pair)),
        "objective_at_zero": float(length_gap_objective(
            np.float32(0.0), reward, lengths, valid, objective=config.search.objective)),
        "reward_margin_mean": float(np.mean([p["chosen_reward"] - p["rejected_reward"]
                                             for p in pairs])),
        "replay": {"gamma": config.gamma, "num_generated": mix.num_generated,
                   "num_offline": mix.num_offline,
                   "offline_shortfall": mix.offline_shortfall, "num_rows": len(mixed)},
        "reward_health": round_diagnostics(reward, shaped, lengths, valid,
                                           (chosen, rejected, is_pair), gold_scores),
    }
    return RoundData(rows, pairs, mixed, search, stats, before, after, reward, lengths, valid)


def offline_only(offline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """D_offline in D_t's row format: what a round whose reward failed the guard trains
    on (`dice.guard.action=offline`)."""
    return [_uniform_row(dict(normalise_row(row, j), source="offline"))
            for j, row in enumerate(offline)]


_META = ("prompt_index", "chosen_index", "rejected_index", "chosen_reward", "rejected_reward",
         "chosen_length", "rejected_length")


def _uniform_row(row: dict[str, Any]) -> dict[str, Any]:
    """Same keys in every D_t row, so `datasets` infers one schema."""
    out = {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
           "source": row["source"]}
    out.update({k: row.get(k) for k in _META})
    return out
