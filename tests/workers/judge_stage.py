"""One process of the LLM-judge stage on a global mesh (run by test_multihost_run.py).

argv: process_id port num_processes out_dir. With num_processes > 1 the process joins a
job on loopback; the mesh is fsdp over every device of the job. A tiny random policy
samples K=2 responses to 3 prompts, then `run.stages.judge_stage` has it rate each one,
as the run loop calls it. Prints, as JSON, the judgements and scores this process got.
"""

import json
import os
import sys

process_id, port, num_processes, out_dir = sys.argv[1:5]

import jax  # noqa: E402

if int(num_processes) > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=int(num_processes), process_id=int(process_id))

import numpy as np  # noqa: E402

from dice_jax.checkpoints.random_init import random_config, random_model  # noqa: E402
from dice_jax.fileio import read_jsonl  # noqa: E402
from dice_jax.run.stages import judge_stage  # noqa: E402
from dice_jax.sampling import Sampler, SamplingConfig  # noqa: E402
from dice_jax.sampling.store import save_samples  # noqa: E402
from dice_jax.sharding import make_mesh, param_shardings  # noqa: E402

mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
params, config, tokenizer = random_model("tiny", shardings=param_shardings(
    random_config("tiny"), mesh))
prompts = ["Name a colour.", "Count to three.", "Say hello in French."]
sampling = SamplingConfig(num_samples=2, max_new_tokens=12, temperature=1.0, seed=5,
                          max_prompt_tokens=64, progress=False)
mine = os.path.join(out_dir, f"process_{process_id}")
samples = os.path.join(mine, "sample")
save_samples(samples, prompts, Sampler(params, config, tokenizer, mesh).sample(prompts,
                                                                              sampling))
os.makedirs(os.path.join(mine, "judge"))
info = judge_stage(os.path.join(mine, "judge"), "round_1/judge", samples, params, config,
                   tokenizer, mesh, sampling, max_new_tokens=16)
rows = read_jsonl(os.path.join(mine, "judge", "judgements.jsonl"))
with np.load(os.path.join(mine, "judge", "scores.npz")) as f:
    scores = f["judge_scores"]
result = {"process": jax.process_index(), "devices": jax.device_count(), "info": info,
          "judgements": [r["judgement"] for r in rows],
          "nan": np.isnan(scores).tolist()}
if int(num_processes) > 1:
    jax.distributed.shutdown()
print(json.dumps(result), flush=True)
