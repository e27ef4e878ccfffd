"""The memory plan: per-device bytes from abstract shapes, for any preset on any mesh."""

import os
import subprocess
import sys

import pytest

from dice_jax.models.presets import llama3_8b, smollm2_135m, tiny
from dice_jax.training.config import TrainConfig
from dice_jax.training.memory import main, memory_plan


def test_llama3_8b_on_fsdp8_fits_80gb_devices():
    config = llama3_8b()
    plan = memory_plan(config, {"fsdp": 8})
    n = config.num_params
    assert plan.num_params == n == 8_030_261_248
    # Every Llama-3-8B tensor has an embed (4096) dim, split 8 ways: params, grads (f32)
    # and Adam's two moments (f32) are each exactly 4 bytes x n / 8 per device.
    assert plan.params_bytes == plan.grads_bytes == 4 * n // 8
    # Plus the optimizer's scalar step counters: a few bytes, well under 64.
    assert plan.opt_state_bytes == pytest.approx(2 * 4 * n / 8, abs=64)
    # The plan's total, quoted to 2 decimals in GB (README): the rounding of that figure.
    assert plan.total_bytes / 1e9 == pytest.approx(16.06, abs=0.01)
    assert plan.total_bytes < 0.25 * 80e9  # leaves > 60 GB of an 80 GB GPU for activations
    accum = memory_plan(config, {"fsdp": 8}, TrainConfig(batch_size=4, grad_accum=4))
    assert accum.accum_bytes == plan.grads_bytes


def test_indivisible_dims_are_replicated_and_meshes_resolve():
    # SmolLM2: 9 heads / 3 kv heads do not divide tensor=2 -> those dims stay whole.
    one = memory_plan(smollm2_135m(), {"data": 1, "fsdp": 1, "tensor": 1})
    split = memory_plan(smollm2_135m(), {"data": 2, "fsdp": 2, "tensor": 2})
    assert one.params_bytes / 4 < split.params_bytes < one.params_bytes / 2
    bf16 = memory_plan(tiny(param_dtype="bfloat16"), {"fsdp": -1}, num_devices=4)
    assert bf16.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert bf16.params_bytes * 2 == bf16.grads_bytes  # grads are float32
    with pytest.raises(ValueError, match="cannot fill"):
        memory_plan(tiny(), {"fsdp": -1})


def test_cli(capsys):
    assert main(["--preset", "llama3_8b", "--mesh", "fsdp=8"]) == 0
    out = capsys.readouterr().out
    assert "8 devices" in out and "total" in out and "16.061 GB" in out
    proc = subprocess.run([sys.executable, "-m", "dice_jax.training.memory", "--preset",
                           "tiny", "--mesh", "fsdp=2,model=2"], capture_output=True, text=True)
    assert proc.returncode == 2 and "bad mesh entry" in proc.stderr


def test_runtime_never_imports_torch(tmp_path):
    # Every module of the package, then a TensorBoard writer (tensorboardX imports torch
    # when it is installed, as it is in the test environment).
    code = ("import importlib, pkgutil, sys, dice_jax\n"
            "for m in pkgutil.walk_packages(dice_jax.__path__, 'dice_jax.'):\n"
            "    importlib.import_module(m.name)\n"
            "from dice_jax.run.metrics import MetricsWriter\n"
            f"w = MetricsWriter({str(tmp_path)!r}, 'round_1')\n"
            "w.write({'step': 1, 'loss': 0.5}); w.close()\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
