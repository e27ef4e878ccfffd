"""Two JAX processes on loopback (gloo collectives) share one fsdp=8 mesh: import streams
each tensor onto the global sharding and the forward pass matches one process."""

import socket

import jax.numpy as jnp
import numpy as np
from helpers import padded_batch, run_processes_on_cpu_devices, save_hf, tiny_hf_model

from dice_jax.checkpoints.hf import import_hf_folder
from dice_jax.models.decoder import Decoder, positions_from_mask


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_one_mesh(tmp_path):
    folder = save_hf(tiny_hf_model("llama"), str(tmp_path / "m"))
    ids, mask = padded_batch(97, [10, 4, 10, 7, 2, 9, 10, 5], 10,
                             left=[True, False] * 4, seed=8)
    params, config = import_hf_folder(folder)
    reference = np.asarray(Decoder(config).apply(
        {"params": params}, jnp.asarray(ids), positions_from_mask(jnp.asarray(mask)),
        jnp.asarray(mask)))
    np.savez(tmp_path / "batch.npz", ids=ids, mask=mask, reference=reference)
    results = run_processes_on_cpu_devices("multiprocess_worker.py", _free_port(), folder,
                                           tmp_path / "batch.npz", processes=2, devices=4)
    for i, out in enumerate(results):
        assert out["process"] == i and out["devices"] == 8 and out["local_devices"] == 4
        assert not out["fully_addressable"]  # the weights really span both processes
        # float32 both ways; only the fsdp all-gathers reorder the sums over 64 features.
        assert out["max_abs_diff"] <= 1e-5
