"""Run by test_sharding.py through `helpers.run_on_cpu_devices` (8 simulated CPU devices).

Imports an HF folder onto three meshes and prints the max |logits - logits_1device| per mesh
and the parameter shardings' specs, as JSON.
"""

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dice_jax.checkpoints.hf import import_hf_folder
from dice_jax.models.decoder import Decoder, positions_from_mask
from dice_jax.sharding import DEFAULT_RULES, make_mesh, param_shardings


def main(folder: str, ids_path: str) -> None:
    data = np.load(ids_path)
    ids, mask = jnp.asarray(data["ids"]), jnp.asarray(data["mask"])
    result = {"devices": jax.device_count()}
    reference = None
    for name, axes in [("single", {"data": 1, "fsdp": 1, "tensor": 1}),
                       ("fsdp8", {"data": 1, "fsdp": -1, "tensor": 1}),
                       ("d2f2t2", {"data": 2, "fsdp": 2, "tensor": 2})]:
        devices = jax.devices()[:1] if name == "single" else None
        mesh = make_mesh(axes, devices)
        from dice_jax.models.config import ModelConfig
        config = ModelConfig.from_hf_file(f"{folder}/config.json")
        shardings = param_shardings(config, mesh)
        params, config = import_hf_folder(folder, shardings)
        with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
            model = Decoder(config)
            fwd = jax.jit(lambda p, i, m, model=model: model.apply(
                {"params": p}, i, positions_from_mask(m), m))
            logits = np.asarray(fwd(params, ids, mask))
        if reference is None:
            reference = logits
        result[name] = float(np.max(np.abs(logits - reference)))
        result[name + "_specs"] = {
            "q_proj": str(params["layers"]["attn"]["q_proj"].sharding.spec),
            "embed": str(params["embed"].sharding.spec),
            "num_shards_q": len({str(s.index) for s in
                                 params["layers"]["attn"]["q_proj"].addressable_shards}),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
