"""Run by test_train_sharded.py through `helpers.run_on_cpu_devices` (8 simulated CPU devices).

Trains the tiny model for a few steps on one device, on fsdp=8 and on data=2 x fsdp=2 x
tensor=2, from the same initial parameters and data, and prints the per-step losses and
the shardings of parameters, optimizer state and batches, as JSON.
"""

import json
import sys
import tempfile

import jax
from train_helpers import init_params, synthetic_pairs, tiny_config

from dice_jax.sharding import make_mesh
from dice_jax.training.config import TrainConfig
from dice_jax.training.loop import DPOTrainer


def main() -> None:
    config = tiny_config()
    params = jax.device_get(init_params(config, seed=1))
    data = synthetic_pairs(64, seed=2, max_length=32)
    cfg = TrainConfig(beta=0.1, learning_rate=1e-3, max_steps=4, batch_size=16, grad_accum=2,
                      max_length=32, max_prompt_length=16, logits_chunk=8, eval_every=0,
                      save_every=0)
    result = {"devices": jax.device_count()}
    for name, axes in [("single", {"data": 1, "fsdp": 1, "tensor": 1}),
                       ("whole", {"data": 1, "fsdp": 1, "tensor": 1}),
                       ("fsdp8", {"data": 1, "fsdp": 8, "tensor": 1}),
                       ("d2f2t2", {"data": 2, "fsdp": 2, "tensor": 2})]:
        mesh = make_mesh(axes, jax.devices()[:1] if name in ("single", "whole") else None)
        # "whole": each row runs prompt and response (no shared-prompt layout)
        trainer = DPOTrainer(cfg.replace(shared_prompt=name != "whole"), config, params, data,
                             tempfile.mkdtemp(), mesh=mesh, progress=False, log=lambda _: None)
        history = trainer.train()
        batch, _ = trainer._train_batch(0)
        state = trainer.state
        result[name] = {
            "losses": [h["loss"] for h in history],
            "grad_norms": [h["grad_norm"] for h in history],
            "q_proj": str(state.params["layers"]["attn"]["q_proj"].sharding.spec),
            "adam_mu_q_proj": str(state.opt_state[1][0].mu["layers"]["attn"]["q_proj"]
                                  .sharding.spec),
            "batch": str(batch["input_ids" if name == "whole" else "response_ids"]
                         .sharding.spec),
            "prompt_batch": str(batch["input_ids" if name == "whole" else "prompt_ids"]
                                .sharding.spec),
            "mu_shards": len({str(s.index) for s in state.opt_state[1][0].mu["layers"]["attn"]
                              ["q_proj"].addressable_shards}),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
