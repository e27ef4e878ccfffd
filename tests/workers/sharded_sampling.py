"""Run by test_sampling.py through `helpers.run_on_cpu_devices` (8 simulated CPU devices).

Samples from a tiny HF folder on one device and on two 8-device meshes (the continuous
engine; the static one too on one device and on `data8`) and prints, as JSON,
each run's tokens and log-probs, plus the placement of a weight and of the batch.
"""

import json
import sys

import jax

from dice_jax.checkpoints.hf import import_hf_folder
from dice_jax.sampling import Sampler, SamplingConfig
from dice_jax.sampling.sampler import sampling_param_shardings
from dice_jax.sharding import make_mesh


def main(folder: str) -> None:
    params, config = import_hf_folder(folder)
    rows = [[5, 17, 33, 8, 90, 12, 7], [44, 3, 61], list(range(10, 30)), [71, 72, 73, 74]]
    cfg = SamplingConfig(num_samples=4, max_new_tokens=24, temperature=1.0, top_p=0.9,
                         top_k=30, seed=3, progress=False)
    result = {"devices": jax.device_count()}
    for name, axes, engine in [
            ("single", None, "continuous"), ("single_static", None, "static"),
            ("data8", {"data": 8, "fsdp": 1, "tensor": 1}, "continuous"),
            ("data8_static", {"data": 8, "fsdp": 1, "tensor": 1}, "static"),
            ("d2f2t2", {"data": 2, "fsdp": 2, "tensor": 2}, "continuous")]:
        mesh = None if axes is None else make_mesh(axes)
        sampler = Sampler(params, config, mesh=mesh)
        out = sampler.sample(rows, cfg, engine=engine)
        result[name] = {
            "tokens": [[s.token_ids.tolist() for s in g] for g in out.samples],
            "logprobs": [[s.logprobs.tolist() for s in g] for g in out.samples],
            "shapes": out.shapes,
        }
        if mesh is not None:
            q = sampling_param_shardings(config, mesh)["layers"]["attn"]["q_proj"]
            result[name]["q_spec"] = str(q.spec)
            result[name]["q_devices"] = len(sampler.params["layers"]["attn"]["q_proj"].sharding
                                            .device_set)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
