"""Algorithm 1, line 2: `log pi(y|x)` and `log pi_ref(y|x)` of every sampled response.

Both are sums of token log-probs over the response tokens only, the stop (end-of-turn)
token included, exactly the masking of training (`dice_jax.training.logprobs`).

- `log pi_ref` always comes from a forward pass of the reference model over the exact
  sampled token ids (prompt ids as templated by the sampler, then the response ids).
- `log pi` is, by default, the sum of the sampler's own per-token log-probs (the
  untempered log-softmax of the policy that sampled): the same quantity, already paid for,
  as `tests/test_scoring.py` checks against a full forward for stopped and length-limited
  responses. `reuse_policy_logps=False` runs a policy forward instead (needed when the
  sampler ran in a lower precision than the scoring should use, or with a different model).

The forwards are the generic packed scorer's (`dice_jax.training.scoring.sequence_scores`:
shared prompts, packing, length buckets, placement on a mesh); this module turns a stored
`SampleSet` into its rows and the results into `ScoredSamples`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from jax.sharding import Mesh

from dice_jax.data import prompt_text
from dice_jax.dice.builder import ScoredSamples
from dice_jax.errors import DiceError
from dice_jax.models.config import ModelConfig
from dice_jax.sampling.store import SampleSet
from dice_jax.sharding import DEFAULT_RULES, Rules
from dice_jax.training.logprobs import DEFAULT_CHUNK
from dice_jax.training.scoring import Buckets, sequence_scores

log = logging.getLogger("dice_jax.scoring")


def stored_policy_logps(sample_set: SampleSet) -> np.ndarray:
    """`log pi(y|x)` float32 `[P, K]`: the sampler's per-token log-probs summed (in
    float64, then rounded)."""
    return np.array([[np.sum(lp, dtype=np.float64) for lp in row]
                     for row in sample_set.logprobs], np.float64).reshape(
        sample_set.num_prompts, sample_set.num_samples).astype(np.float32)


def scored_samples(sample_set: SampleSet, logp_policy: np.ndarray,
                   logp_reference: np.ndarray, token_counts: np.ndarray) -> ScoredSamples:
    """A round's `ScoredSamples`: the samples' prompt strings (`data.prompt_text`), texts and
    finish reasons with the log-probs `logp_policy`, `logp_reference` float32 `[P, K]` and
    response token counts `[P, K]` (any shape of P * K values; reshaped)."""
    p, k = sample_set.num_prompts, sample_set.num_samples
    return ScoredSamples(
        prompts=[prompt_text(x, f"prompt {i}") for i, x in enumerate(sample_set.prompts)],
        responses=[list(row) for row in sample_set.texts],
        token_counts=np.asarray(token_counts).reshape(p, k),
        finish_reasons=[list(row) for row in sample_set.finish_reasons],
        logp_policy=np.asarray(logp_policy).reshape(p, k),
        logp_reference=np.asarray(logp_reference).reshape(p, k))


def score_samples(sample_set: SampleSet, model_config: ModelConfig, reference_params: Any,
                  policy_params: Any = None, *, mesh: Mesh | None = None,
                  batch_size: int = 16, reuse_policy_logps: bool = True,
                  buckets: Buckets = "auto", share_prompts: bool = True,
                  prompt_group: int | None = None, pack_tokens: bool = True,
                  chunk_size: int = DEFAULT_CHUNK, rules: Rules = DEFAULT_RULES,
                  progress: bool = True) -> ScoredSamples:
    """Both models' sequence log-probs of every sampled response, as `ScoredSamples`.

    `log pi_ref` from a forward of `reference_params`; `log pi` from the sampler's stored
    token log-probs (`reuse_policy_logps=True`; `policy_params` is then not used) or from
    a forward of `policy_params`. Both models share `model_config`. Token counts `[P, K]`
    include the stop token. The other options are `sequence_scores`'.
    """
    sample_set.validate()
    p, k = sample_set.num_prompts, sample_set.num_samples
    if p == 0 or k == 0:
        raise DiceError(f"nothing to score: {p} prompts x {k} samples")
    if not reuse_policy_logps and policy_params is None:
        raise DiceError("score_samples: reuse_policy_logps=False needs policy_params")
    for i, x in enumerate(sample_set.prompts):  # before the forwards: fail fast
        prompt_text(x, f"prompt {i}")
    prompts = sample_set.prompt_token_ids
    index = np.repeat(np.arange(p), k).tolist()  # response n continues prompt n // K
    responses = [ids for row in sample_set.token_ids for ids in row]
    kw: dict[str, Any] = dict(mesh=mesh, batch_size=batch_size, buckets=buckets,
                              share_prompts=share_prompts, prompt_group=prompt_group,
                              pack_tokens=pack_tokens, chunk_size=chunk_size, rules=rules,
                              progress=progress)
    start = time.perf_counter()
    ref, counts = sequence_scores(reference_params, model_config, prompts, responses, index,
                                  desc="reference log-probs", **kw)
    if reuse_policy_logps:
        policy = stored_policy_logps(sample_set)
    else:
        policy, _ = sequence_scores(policy_params, model_config, prompts, responses, index,
                                    desc="policy log-probs", **kw)
    log.info("scored %d responses (%d tokens) in %.1f s%s", p * k,
             k * sum(len(x) for x in prompts) + int(counts.sum()), time.perf_counter() - start,
             "" if reuse_policy_logps else " (policy and reference forwards)")
    return scored_samples(sample_set, policy, ref, counts)
