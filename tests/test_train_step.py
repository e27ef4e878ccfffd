"""The jitted train step: gradient accumulation, mixed precision + remat, non-finite stop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import init_params, synthetic_pairs, tiny_config

from dice_jax.errors import DiceError
from dice_jax.sharding import make_mesh
from dice_jax.training.config import TrainConfig
from dice_jax.training.logprobs import pair_logprobs_jit
from dice_jax.training.loop import DPOTrainer
from dice_jax.training.state import (
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
    train_state_shardings,
)
from dice_jax.training.step import make_train_step

CFG = TrainConfig(beta=0.1, learning_rate=1e-3, max_steps=1, batch_size=8, max_length=32,
                  max_prompt_length=16, logits_chunk=8, eval_every=0, save_every=0)


def one_step(cfg, config, params, data, ref):
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    optimizer = make_optimizer(cfg)
    shardings = train_state_shardings(config, optimizer, mesh)
    state = init_train_state(params, optimizer, shardings)
    step = make_train_step(config, cfg, optimizer, mesh, shardings)
    accum, micro = cfg.grad_accum, cfg.micro_batch_size
    batch = {k: jnp.asarray(v.reshape(accum, micro, *v.shape[1:]))
             for k, v in data.as_dict().items()}
    batch["ref_logps"] = jnp.asarray(ref.reshape(accum, micro, 2))
    state, metrics = step(state, batch)
    return jax.device_get(state.params), {k: float(v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    params = jax.device_get(init_params(config, seed=7))
    data = synthetic_pairs(8, seed=8, max_length=32)
    # A reference that differs from the policy, so the loss is not at its log(2) start.
    ref_params = jax.device_get(init_params(config, seed=9))
    ref = np.asarray(pair_logprobs_jit(ref_params, {k: jnp.asarray(v) for k, v in
                                                    data.as_dict().items()}, config, 8)[0])
    return config, params, data, ref


def test_grad_accumulation_4x2_equals_one_batch_of_8(setup):
    config, params, data, ref = setup
    p1, m1 = one_step(CFG, config, params, data, ref)
    p4, m4 = one_step(CFG.replace(grad_accum=4), config, params, data, ref)
    assert m1["loss"] == pytest.approx(m4["loss"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)
    moved = max(float(np.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
    assert moved > 5e-4  # the step really changed the weights (lr 1e-3)
    assert m1["finite"] == 1.0 and m1["learning_rate"] == pytest.approx(1e-3)


def test_bfloat16_compute_with_remat_keeps_float32_master_weights(setup):
    config, params, data, ref = setup
    p32, m32 = one_step(CFG, config, params, data, ref)
    p16, m16 = one_step(CFG, config.replace(dtype="bfloat16", remat=True), params, data, ref)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(p16))
    assert m16["loss"] == pytest.approx(m32["loss"], rel=0.05)
    assert m16["grad_norm"] == pytest.approx(m32["grad_norm"], rel=0.1)
    # Remat alone (float32) changes nothing but memory.
    pr, mr = one_step(CFG, config.replace(remat=True), params, data, ref)
    assert mr["loss"] == pytest.approx(m32["loss"], abs=1e-6)
    for a, b in zip(jax.tree.leaves(pr), jax.tree.leaves(p32)):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_warmup_then_constant_learning_rate():
    schedule = learning_rate_schedule(TrainConfig(learning_rate=1e-6, warmup_steps=4))
    assert [float(schedule(s)) for s in range(6)] == pytest.approx(
        [0.0, 0.25e-6, 0.5e-6, 0.75e-6, 1e-6, 1e-6])


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    config = tiny_config()
    params = init_params(config, seed=1)
    data = synthetic_pairs(32, seed=3, max_length=32)
    cfg = CFG.replace(max_steps=6, save_every=2)
    trainer = DPOTrainer(cfg, config, params, data, str(tmp_path), progress=False,
                         log=lambda _: None)
    trainer.train(until_step=2)
    assert trainer.manager.latest_step() == 2
    before = jax.device_get(trainer.state.params)
    trainer.reference["train"][:] = np.nan  # poisons the loss of every later step
    with pytest.raises(DiceError, match=r"non-finite loss .* step 3.*last good checkpoint is "
                                        r"step 2"):
        trainer.train()
    assert trainer.manager.latest_step() == 2 and int(trainer.state.step) == 2
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(trainer.params))):
        np.testing.assert_array_equal(a, b)  # the bad update was not applied
    resumed = DPOTrainer(cfg, config, params, data, str(tmp_path), progress=False,
                         log=lambda _: None)
    assert int(resumed.state.step) == 2
