"""Run by test_prefill_memory.py through `helpers.run_on_cpu_devices` (8 simulated CPU
devices).

Samples prompts of bucket LENGTH (argv[1]) from the tiny random model on one device with
the default budget (one prefill call per batch), and on a `data8` mesh with a budget whose
prefill share holds 3 prompts: the static engine with 16 rows split over the shards
(prefill calls of one prompt per shard), with 4 rows that are not split (calls of one
prompt), and the continuous engine. Prints, as JSON, each run's tokens and log-probs, the
static runs' prefill calls (rows, start) and the collectives in the compiled part.
"""

import dataclasses
import json
import sys

import jax
import numpy as np

from dice_jax.checkpoints.random_init import random_model
from dice_jax.sampling import Sampler, SamplingConfig
from dice_jax.sampling import sampler as sampler_module
from dice_jax.sampling import slots as slot_programs
from dice_jax.sampling.generate import PREFILL_SHARE, prefill_bytes
from dice_jax.sharding import make_mesh

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce",
               "reduce-scatter")


def flat(result) -> dict:
    return {"tokens": [[s.token_ids.tolist() for s in g] for g in result.samples],
            "logprobs": [[s.logprobs.tolist() for s in g] for g in result.samples]}


def main(length: int) -> None:
    params, config, _ = random_model("tiny")
    rng = np.random.default_rng(5)
    rows = [rng.integers(3, 250, size=int(k)).tolist()
            for k in rng.integers(length // 2 + 1, length + 1, size=12)]
    budget = 3.5 * prefill_bytes(config, length) / PREFILL_SHARE / 2**30
    cases = {
        "many": (rows, SamplingConfig(num_samples=2, max_new_tokens=8, temperature=1.0,
                                      top_k=20, seed=3, progress=False)),
        "few": (rows[:3], SamplingConfig(num_samples=8, max_new_tokens=8, temperature=1.0,
                                         seed=6, progress=False)),
    }
    result = {"devices": jax.device_count(), "single": {}}
    single = Sampler(params, config)
    for case, (prompts, cfg) in cases.items():
        result["single"][case] = flat(single.sample(prompts, cfg, engine="static"))

    sampler = Sampler(params, config, mesh=make_mesh({"data": 8, "fsdp": 1, "tensor": 1}))
    real = sampler_module.prefill_part
    calls: list = []

    def counted(params, segments, logits, ids, mask, start, **kw):
        if not calls:
            text = real.lower(params, segments, logits, ids, mask, start,
                              **kw).compile().as_text()
            calls.append(sum(text.count(op) for op in COLLECTIVES))
        calls.append([int(ids.shape[0]), int(start)])
        return real(params, segments, logits, ids, mask, start, **kw)

    sampler_module.prefill_part = counted
    for name, case in (("sharded_parts", "many"), ("replicated_parts", "few")):
        prompts, cfg = cases[case]
        calls.clear()
        out = sampler.sample(prompts, dataclasses.replace(cfg, cache_budget_gb=budget),
                             engine="static")
        result[name] = dict(flat(out), case=case, collectives=calls[0], calls=calls[1:])
    sampler_module.prefill_part = real

    sizes: list[int] = []
    real_slots = slot_programs.prefill

    def counted_slots(params, staging, staging_logits, ids, *args, **kw):
        sizes.append(int(ids.shape[0]))
        return real_slots(params, staging, staging_logits, ids, *args, **kw)

    slot_programs.prefill = counted_slots
    prompts, cfg = cases["many"]
    out = sampler.sample(prompts, dataclasses.replace(cfg, cache_budget_gb=budget),
                         engine="continuous")
    result["continuous"] = dict(flat(out), case="many", max_call=max(sizes))
    print(json.dumps(result))


if __name__ == "__main__":
    main(int(sys.argv[1]))
