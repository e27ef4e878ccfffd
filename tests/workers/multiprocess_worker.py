"""One process of a 2-process JAX job on loopback (run by test_multiprocess.py through
`helpers.run_processes_on_cpu_devices`, 4 simulated CPU devices per process).

argv: process_id port hf_folder batch.npz. Imports the HF folder onto a global fsdp=8 mesh
spanning both processes, runs the forward pass, and prints, as JSON, its process's view of
the logits' max deviation from the single-process reference.
"""

import json
import os
import sys

process_id, port, folder, batch_path = sys.argv[1:5]

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=int(process_id))

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from dice_jax.checkpoints.hf import import_hf_folder  # noqa: E402
from dice_jax.models.config import ModelConfig  # noqa: E402
from dice_jax.models.decoder import Decoder, positions_from_mask  # noqa: E402
from dice_jax.sharding import DEFAULT_RULES, make_mesh, param_shardings  # noqa: E402

mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
config = ModelConfig.from_hf_file(os.path.join(folder, "config.json"))
params, config = import_hf_folder(folder, param_shardings(config, mesh))
batch = np.load(batch_path)
with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    model = Decoder(config)
    logits = jax.jit(lambda p, i, m: model.apply({"params": p}, i, positions_from_mask(m), m))(
        params, jnp.asarray(batch["ids"]), jnp.asarray(batch["mask"]))
    full = multihost_utils.process_allgather(logits, tiled=True)
q = params["layers"]["attn"]["q_proj"]
result = {"process": jax.process_index(), "devices": jax.device_count(),
          "local_devices": jax.local_device_count(),
          "fully_addressable": bool(q.is_fully_addressable),
          "max_abs_diff": float(np.max(np.abs(np.asarray(full) - batch["reference"])))}
jax.distributed.shutdown()
print(json.dumps(result), flush=True)
