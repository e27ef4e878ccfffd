"""Fresh samples of a model on the toy task, judged against the gold reward.

`probe_policy` samples K responses per prompt from a policy and reports the three figures
the controlled task is about:

- `gold`: the mean gold reward of the samples (`language.gold_reward` via the judge);
- `accuracy`: how well the implicit reward `beta * log(pi / pi_ref)` ranks them against
  the gold reward: over every pair of samples of the same prompt whose gold rewards
  differ, the fraction where the reward orders them the same way (a reward tie counts
  as wrong, as in the data stage's held-out check); None without a reference;
- `length`: the mean response length in characters.

`probe_run` does this for every model of a finished run folder (start, round 0, round 1,
...), each round's policy against the reference it was trained with: pi_theta(t-1) for
DICE and offline DPO with a new reference, the start model for offline DPO.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from dice_jax.dice.scoring import score_samples
from dice_jax.errors import DiceError
from dice_jax.judge.score import score_response
from dice_jax.sampling.config import SamplingConfig
from dice_jax.sampling.sampler import Sampler
from dice_jax.sampling.store import SampleSet


def pairwise_accuracy(reward: np.ndarray, gold: np.ndarray) -> tuple[float | None, int]:
    """`(accuracy, pairs)`: over the within-prompt pairs of `reward`, `gold` `[P, K]` whose
    gold values differ, the fraction where `reward` is strictly higher for the one with
    the higher gold (None when no pair's gold differs)."""
    reward, gold = np.asarray(reward, np.float64), np.asarray(gold, np.float64)
    if reward.shape != gold.shape or reward.ndim != 2:
        raise DiceError(f"reward {reward.shape} and gold {gold.shape} must be equal [P, K]")
    right = total = 0
    for i, j in itertools.combinations(range(reward.shape[1]), 2):
        differ = gold[:, i] != gold[:, j]
        agree = (reward[:, i] - reward[:, j]) * (gold[:, i] - gold[:, j]) > 0
        total += int(differ.sum())
        right += int((agree & differ).sum())
    return (right / total if total else None), total


@dataclasses.dataclass(frozen=True)
class Probe:
    """The figures of one model's fresh samples (see the module doc)."""

    gold: float
    accuracy: float | None
    pairs: int
    length: float
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def probe_policy(policy: Any, reference: Any | None, model_config: Any, tokenizer: Any,
                 prompt_rows: Sequence[dict[str, Any]], sampling: SamplingConfig,
                 beta: float, mesh: Any = None) -> Probe:
    """Samples `sampling.num_samples` responses per prompt row from `policy` and measures
    them; `reference=None` (the start model) gives no implicit reward."""
    prompts = [row["prompt"] for row in prompt_rows]
    result = Sampler(policy, model_config, tokenizer, mesh).sample(prompts, sampling)
    texts = [[s.text for s in row] for row in result.samples]
    gold = np.array([[score_response(row, t).score for t in ts]
                     for row, ts in zip(prompt_rows, texts, strict=True)])
    length = float(np.mean([[len(t) for t in ts] for ts in texts]))
    accuracy, pairs = None, 0
    if reference is not None:
        scored = score_samples(SampleSet.from_result(prompts, result), model_config,
                               reference, mesh=mesh, progress=sampling.progress)
        reward = beta * (np.asarray(scored.logp_policy, np.float64)
                         - np.asarray(scored.logp_reference, np.float64))
        accuracy, pairs = pairwise_accuracy(reward, gold)
    return Probe(float(gold.mean()), accuracy, pairs, length, int(gold.size))


def round_names(rounds: int) -> list[str]:
    """`start`, `round 0`, `round 1`, ...: the categorical axis of the toy task's plots."""
    return ["start"] + [f"round {t}" for t in range(rounds + 1)]


def probe_run(run: Any, prompt_rows: Sequence[dict[str, Any]], num_samples: int,
              seed: int = 12345, skip: dict[str, Probe] | None = None) -> dict[str, Probe]:
    """Probes every model of a finished `dice_jax.run.loop.DiceRun` with round 0.

    Each model samples `num_samples` responses per prompt with the run's sampling
    settings and `seed` (the same for every model). `skip`: probes already taken of
    the same models (e.g. the start and round 0 that runs share), used as they are.
    Returns `{round name: Probe}`.
    """
    config, models = run.config, run.models
    if not config.round0:
        raise DiceError("probe_run needs a run with round 0 (the gold-labelled DPO round)")
    sampling = dataclasses.replace(config.sampling, num_samples=num_samples, seed=seed,
                                   progress=run.progress)
    start = config.model.policy
    models.ensure_loaded()
    out = {}
    for name, t in zip(round_names(config.rounds), range(-1, config.rounds + 1), strict=True):
        if skip and name in skip:
            out[name] = skip[name]
            continue
        if t < 0:
            policy, reference = start, None
        elif t == 0 or config.method == "offline_dpo":
            policy, reference = models.policy_source(t), models.reference_source(0)
        else:
            policy, reference = models.policy_source(t), models.policy_source(t - 1)
        out[name] = probe_policy(
            models.load(policy), None if reference is None else models.load(reference),
            models.model_config, models.tokenizer, prompt_rows, sampling, config.train.beta,
            run.mesh)
    return out
