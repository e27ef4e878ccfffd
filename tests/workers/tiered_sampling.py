"""Run by test_continuous_batching.py through `helpers.run_on_cpu_devices` (2 simulated CPU
devices).

Samples from a tiny HF folder with static batches on one device, then with the continuous
engine on a 2-way `data` mesh under a cache budget that holds 64 tiered decode slots (32 a
shard) but only 40 whole ones; prints, as JSON, both runs' tokens and log-probs, the plan's
tiers and how many rows were moved to a longer slot.
"""

import json
import sys

import numpy as np

from dice_jax.checkpoints.hf import import_hf_folder
from dice_jax.models.decoder import cache_bytes
from dice_jax.sampling import Sampler, SamplingConfig
from dice_jax.sampling import slots as slot_programs
from dice_jax.sharding import make_mesh


def main(folder: str) -> None:
    params, config = import_hf_folder(folder)
    rng = np.random.default_rng(2)
    rows = [rng.integers(3, 97, size=n).tolist() for n in (30, 4, 17, 9)]
    # Prompt bucket 32 + 200 new tokens: 4 chunks of 64 a whole slot, 2 a short one.
    logits = config.vocab_size * 4
    staged = 5 * (cache_bytes(config, 1, 32) + logits)
    unit = 2 * (20 * cache_bytes(config, 1, 64) + 8 * logits)  # 8 slots a shard, tiered
    cfg = SamplingConfig(num_samples=20, max_new_tokens=200, temperature=1.0, top_p=0.95,
                         seed=4, stop_token_ids=(5,), progress=False,
                         cache_budget_gb=(staged + 4 * unit) / 2**30)
    moved = []
    permute = slot_programs.permute

    def counted_permute(cache, state, order, *, program):
        limits = program.slot_limits(len(order))
        moved.append(int(sum(limits[i] > limits[o]
                             for i, o in enumerate(np.asarray(order).tolist()))))
        return permute(cache, state, order, program=program)

    slot_programs.permute = counted_permute
    result = {}
    for name, mesh, engine in [("static", None, "static"),
                               ("tiered", make_mesh({"data": 2, "fsdp": 1, "tensor": 1}),
                                "continuous")]:
        sampler = Sampler(params, config, mesh=mesh)
        out = sampler.sample(rows, cfg, engine=engine)
        result[name] = {
            "tokens": [[s.token_ids.tolist() for s in g] for g in out.samples],
            "logprobs": [[s.logprobs.tolist() for s in g] for g in out.samples],
            "lengths": [len(rows[s.prompt_index]) + s.length for g in out.samples for s in g],
        }
        if engine == "continuous":
            plan = sampler.slot_engine(rows, cfg).plan
            result[name].update(tiers=[[w, list(c)] for w, c in plan.tiers],
                                moved=sum(moved), engine=out.engine)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
