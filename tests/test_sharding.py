"""Sharding: logical names on every parameter, mesh building, and 8-device parity."""

import typing

import flax.linen as nn
import jax
import numpy as np
import pytest
from helpers import padded_batch, run_on_cpu_devices, save_hf, tiny_hf_model
from jax.sharding import PartitionSpec

from dice_jax.models.presets import PRESETS
from dice_jax.sharding import abstract_params, logical_to_spec, make_mesh


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_parameter_has_logical_names(name):
    boxed = abstract_params(PRESETS[name]())
    specs = jax.tree.leaves(nn.get_partition_spec(boxed),
                            is_leaf=lambda x: isinstance(x, PartitionSpec))
    shapes = jax.tree.leaves(nn.unbox(boxed))
    assert len(specs) == len(shapes) > 0
    for spec, shape in zip(specs, shapes):
        assert len(spec) == len(shape.shape) and all(isinstance(n, str) for n in spec)


def test_make_mesh_checks_sizes():
    devices = jax.devices()[:1]
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, devices)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 1}, devices)


def test_indivisible_dimension_is_replicated():
    class FakeMesh:
        shape: typing.ClassVar = {"data": 1, "fsdp": 4, "tensor": 2}

    spec = logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (30, 576, 3, 64),
                           FakeMesh())
    assert spec == PartitionSpec(None, "fsdp", None, None)


def test_eight_devices_match_one_device(tmp_path):
    folder = save_hf(tiny_hf_model("llama"), str(tmp_path / "m"))
    ids, mask = padded_batch(97, [12, 7, 12, 3, 9, 12, 5, 1], 12,
                             left=[True, True, False, False, True, False, True, True], seed=4)
    np.savez(tmp_path / "batch.npz", ids=ids, mask=mask)
    result = run_on_cpu_devices("sharded_forward.py", folder, tmp_path / "batch.npz")
    assert result["devices"] == 8
    # float32 logits ~1: sharding only reorders the matmuls' sums over 64 features.
    assert result["fsdp8"] <= 1e-5 and result["d2f2t2"] <= 1e-5
    # The weights really are split: fsdp over embed (64 / 8) and tensor over heads.
    assert result["fsdp8_specs"]["num_shards_q"] == 8
    assert "fsdp" in result["fsdp8_specs"]["q_proj"]
    assert "tensor" in result["d2f2t2_specs"]["q_proj"]
