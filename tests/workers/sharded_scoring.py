"""Run by test_scoring.py through `helpers.run_on_cpu_devices` (8 simulated CPU devices).

Scores the same synthetic (prompt, response) rows of two tiny random models on one device,
on fsdp=8 and on data=2 x fsdp=2 x tensor=2 (the reference with shared prompts, the policy
as whole sequences), and prints, as JSON, each run's log-probs plus where the params and a
batch are placed.
"""

import json
import sys

import jax
import numpy as np

from dice_jax.checkpoints.random_init import random_model
from dice_jax.dice.scoring import score_samples
from dice_jax.sampling.store import SampleSet
from dice_jax.sharding import batch_sharding, make_mesh, param_shardings
from dice_jax.training.scoring import data_parallel_size


def synthetic_set(vocab: int, p: int = 5, k: int = 3, seed: int = 0) -> SampleSet:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(4, vocab, int(rng.integers(3, 30))).tolist() for _ in range(p)]
    ids = [[rng.integers(4, vocab, int(rng.integers(1, 40))).astype(np.int32)
            for _ in range(k)] for _ in range(p)]
    logprobs = [[np.full(len(a), -1.0, np.float32) for a in row] for row in ids]
    return SampleSet(prompts=[str(i) for i in range(p)], prompt_token_ids=prompts,
                     texts=[["x"] * k for _ in range(p)], token_ids=ids, logprobs=logprobs,
                     finish_reasons=[["length"] * k for _ in range(p)])


def main() -> None:
    policy, config, _ = random_model("tiny", seed=0)
    reference, _, _ = random_model("tiny", seed=1)
    policy, reference = jax.device_get(policy), jax.device_get(reference)
    samples = synthetic_set(config.vocab_size)
    result = {"devices": jax.device_count()}
    for name, axes in [("single", {"data": 1, "fsdp": 1, "tensor": 1}),
                       ("fsdp8", {"data": 1, "fsdp": 8, "tensor": 1}),
                       ("d2f2t2", {"data": 2, "fsdp": 2, "tensor": 2})]:
        mesh = make_mesh(axes, jax.devices()[:1] if name == "single" else None)
        # Shared prompts for the reference, whole sequences for the policy.
        shared = score_samples(samples, config, reference, mesh=mesh, batch_size=8,
                               buckets=128, progress=False)
        whole = score_samples(samples, config, policy, policy, mesh=mesh, batch_size=8,
                              buckets=128, share_prompts=False, reuse_policy_logps=False,
                              progress=False)
        q = param_shardings(config, mesh)["layers"]["attn"]["q_proj"]
        result[name] = {
            "reference": shared.logp_reference.tolist(),
            "policy": whole.logp_reference.tolist(),
            "counts": shared.token_counts.tolist(),
            "q_spec": str(q.spec),
            "batch_spec": str(batch_sharding(mesh, (8, 64), 0).spec),
            "data_parallel": data_parallel_size(mesh),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
