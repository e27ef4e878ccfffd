"""The jitted train step: gradient accumulation, mixed precision + remat, non-finite stop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
from dice_jax.training.step import make_train_step, micro_batch_loss

CFG = TrainConfig(beta=0.1, learning_rate=1e-3, max_steps=1, batch_size=8, max_length=32,
                  max_prompt_length=16, logits_chunk=8, eval_every=0, save_every=0)


def one_step(cfg, config, params, data, ref, optimizer=None):
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    optimizer = optimizer or make_optimizer(cfg)
    shardings = train_state_shardings(config, optimizer, mesh)
    state = init_train_state(params, optimizer, shardings)
    step = make_train_step(config, cfg, optimizer, mesh, shardings)
    accum, micro = cfg.grad_accum, cfg.micro_batch_size
    batch = {k: jnp.asarray(v.reshape(accum, micro, *v.shape[1:]))
             for k, v in data.as_dict().items()}
    batch["ref_logps"] = jnp.asarray(ref.reshape(accum, micro, 2))
    state, metrics = step(state, batch)
    return jax.device_get(state), {k: float(v) for k, v in metrics.items()}


# An "optimizer" that leaves the weights alone and keeps the step's (accumulated) gradients
# as its state, so a test reads exactly what the train step hands to the optimizer.
CAPTURE_GRADS = optax.GradientTransformation(
    init=lambda params: params,
    update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def step_grads(cfg, config, params, data, ref):
    state, metrics = one_step(cfg, config, params, data, ref, CAPTURE_GRADS)
    return state.opt_state, metrics


# Float32 summation order: a gradient element is a sum over the step's 8 pairs x 2
# sequences x 32 positions = 512 token terms (plus the matmuls' inner sums, which XLA blocks
# differently for 2 rows than for 8). Reordering a float32 sum of n terms moves it by at
# most about n unit roundoffs (2**-24) of the terms' magnitude; with the leaf's largest
# gradient as that magnitude this allows 512 * 6e-8 = 3e-5 of it per leaf. Observed: at most
# 11 roundoffs. A real accumulation bug (a micro-batch dropped or counted twice, a sum
# instead of a mean) is off by a sizeable fraction of the gradient itself.
SUM_TERMS = 8 * 2 * 32


def assert_grads_close(actual, expected):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual),
                            jax.tree.leaves(expected)):
        scale = float(np.abs(b).max())
        assert scale > 0, path
        np.testing.assert_allclose(a, b, rtol=0, atol=SUM_TERMS * 2.0**-24 * scale,
                                   err_msg=jax.tree_util.keystr(path))


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
    g1, m1 = step_grads(CFG, config, params, data, ref)
    g4, m4 = step_grads(CFG.replace(grad_accum=4), config, params, data, ref)
    # Independent reference: the mean of the 8 pairs' gradients, each taken on its own.
    pair_grad = jax.jit(jax.grad(lambda p, b: micro_batch_loss(p, b, config, CFG)[0]))
    arrays = data.as_dict()
    per_pair = [pair_grad(params, {**{k: jnp.asarray(v[i:i + 1]) for k, v in arrays.items()},
                                   "ref_logps": jnp.asarray(ref[i:i + 1])})
                for i in range(8)]
    reference = jax.device_get(jax.tree.map(lambda *g: sum(g) / len(g), *per_pair))
    assert_grads_close(g1, reference)
    assert_grads_close(g4, reference)
    assert_grads_close(g4, g1)
    # The loss is a mean of 8 per-pair values below 1: reordering moves it by a few float32
    # roundoffs (~6e-8 each); 1e-6 leaves ~10x margin. The norm sums 16k squares: 1e-5
    # relative is ~160 roundoffs.
    assert m1["loss"] == pytest.approx(m4["loss"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-5)
    # The captured gradients are what the step clips and feeds AdamW: the norm it reports.
    assert float(optax.global_norm(g1)) == pytest.approx(m1["grad_norm"], rel=1e-5)
    assert m1["finite"] == 1.0 and m1["learning_rate"] == pytest.approx(1e-3)
    # The real optimizer moves the weights (AdamW's first step is ~lr per weight).
    state, _ = one_step(CFG, config, params, data, ref)
    moved = max(float(np.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(state.params), jax.tree.leaves(params)))
    assert moved > 5e-4


def test_bfloat16_compute_with_remat_keeps_float32_master_weights(setup):
    config, params, data, ref = setup
    _, m32 = one_step(CFG, config, params, data, ref)
    s16, m16 = one_step(CFG, config.replace(dtype="bfloat16", remat=True), params, data, ref)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(s16.params))
    # bfloat16 keeps 8 mantissa bits (relative rounding 2**-9 = 0.2% per op); summed over
    # 32-token log-prob sums and 2 layers the loss stays within 5%, the gradient norm (a
    # difference of near-equal chosen/rejected terms, so more sensitive) within 10%.
    assert m16["loss"] == pytest.approx(m32["loss"], rel=0.05)
    assert m16["grad_norm"] == pytest.approx(m32["grad_norm"], rel=0.1)
    # Remat alone (float32) changes nothing but memory: the recomputed forward may only
    # fuse differently, so the loss agrees to float32 roundoff (see the test above) and the
    # gradients to the summation-order bound (not post-AdamW weights, which divide by
    # sqrt(v) and so magnify roundoff where a gradient is near zero).
    g32, _ = step_grads(CFG, config, params, data, ref)
    gr, mr = step_grads(CFG, config.replace(remat=True), params, data, ref)
    assert mr["loss"] == pytest.approx(m32["loss"], abs=1e-6)
    assert_grads_close(gr, g32)


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
