"""The training loop: learning a synthetic preference, restart, reference log-prob cache."""

import json
import os

import jax
import numpy as np
import pytest
from train_helpers import init_params, synthetic_pairs, tiny_config

from dice_jax.training import loop
from dice_jax.training.config import TrainConfig
from dice_jax.training.data import split_pairs
from dice_jax.training.loop import DPOTrainer

CFG = TrainConfig(beta=0.1, learning_rate=1e-3, batch_size=16, max_length=32,
                  max_prompt_length=16, logits_chunk=16, eval_every=0, save_every=0)
QUIET = dict(progress=False, log=lambda _: None)


@pytest.fixture(scope="module")
def model():
    config = tiny_config()
    return config, jax.device_get(init_params(config, seed=0))


def test_tiny_model_learns_a_synthetic_preference(model, tmp_path):
    """Chosen responses repeat the prompt's first token, rejected ones are random."""
    config, params = model
    train, held_out = split_pairs(synthetic_pairs(512, seed=0, max_length=32), 64, seed=0)
    trainer = DPOTrainer(CFG.replace(max_steps=100, eval_every=50), config, params, train,
                         str(tmp_path), held_out, **QUIET)
    assert trainer.evaluate()["eval/rewards/accuracies"] <= 0.6  # policy == reference
    history = trainer.train()
    final = history[-1]
    assert final["eval/rewards/accuracies"] >= 0.9, final
    assert final["eval/loss"] < 0.5 < history[0]["loss"]
    expected = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm",
                "learning_rate", "tokens_per_second", "step"}
    assert expected <= set(final) and final["step"] == 100
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 100 and json.loads(lines[-1])["step"] == 100


def test_restart_from_checkpoint_reproduces_uninterrupted_losses(model, tmp_path):
    config, params = model
    data = synthetic_pairs(40, seed=1, max_length=32)  # 2 batches per epoch: crosses epochs
    cfg = CFG.replace(max_steps=6, save_every=2, batch_size=16, grad_accum=2)
    full = DPOTrainer(cfg, config, params, data, str(tmp_path / "a"), **QUIET).train()
    first = DPOTrainer(cfg, config, params, data, str(tmp_path / "b"), **QUIET)
    killed = first.train(until_step=5)  # checkpoints at 2 and 4; step 5 is lost
    assert first.manager.latest_step() == 4
    del first
    second = DPOTrainer(cfg, config, params, data, str(tmp_path / "b"), **QUIET)
    assert int(second.state.step) == 4
    resumed = second.train()
    assert [h["step"] for h in resumed] == [5, 6]
    assert [h["loss"] for h in killed] == [h["loss"] for h in full[:5]]
    # The checkpoint restores bit-exact state; the re-compiled step may fuse differently,
    # ~1 roundoff of a loss ~0.69 (6e-8): 1e-7.
    np.testing.assert_allclose([h["loss"] for h in resumed], [h["loss"] for h in full[4:]],
                               rtol=0, atol=1e-7)
    assert full[-1]["loss"] != full[0]["loss"]
    assert second.manager.latest_step() == 6
    # A checkpoint written for other data is refused rather than silently mixed.
    other = synthetic_pairs(40, seed=2, max_length=32)
    with pytest.raises(loop.DiceError, match="different training data"):
        DPOTrainer(cfg, config, params, other, str(tmp_path / "b"), **QUIET)


def test_reference_logps_cached_reused_and_invalidated(model, tmp_path, monkeypatch):
    config, params = model
    calls = []
    original = loop.compute_reference_logps

    def counting(*args, **kw):
        calls.append(len(args[2]))
        return original(*args, **kw)

    monkeypatch.setattr(loop, "compute_reference_logps", counting)
    train, held = split_pairs(synthetic_pairs(48, seed=4, max_length=32), 16)
    cfg = CFG.replace(max_steps=1)
    first = DPOTrainer(cfg, config, params, train, str(tmp_path), held, **QUIET)
    assert calls == [32, 16]
    files = sorted(os.listdir(tmp_path / "ref_logps"))
    assert len(files) == 2 and all(f.endswith(".npz") for f in files)
    with np.load(tmp_path / "ref_logps" / files[1]) as f:
        np.testing.assert_array_equal(f["logps"], first.reference["train"])
    first.train()
    # Restart: the reference forward is not run again (the policy has moved by now, but
    # the reference stays the initial one, read from the cache).
    second = DPOTrainer(cfg, config, params, train, str(tmp_path), held, **QUIET)
    assert calls == [32, 16]
    np.testing.assert_array_equal(second.reference["train"], first.reference["train"])
    # Changed data (one token) -> a new key -> recomputed.
    changed = train.take(np.arange(len(train)))
    changed.input_ids = changed.input_ids.copy()
    changed.input_ids[0, 0, 1] += 1
    DPOTrainer(cfg.replace(max_steps=2), config, params, changed, str(tmp_path / "c"), held,
               **QUIET)
    assert calls == [32, 16, 32, 16]
    os.makedirs(tmp_path / "d" / "ref_logps")
    for f in files:  # same cache, changed data: only the unchanged eval split is reused
        os.link(tmp_path / "ref_logps" / f, tmp_path / "d" / "ref_logps" / f)
    DPOTrainer(cfg, config, params, changed, str(tmp_path / "d"), held, **QUIET)
    assert calls == [32, 16, 32, 16, 32]
    # A different reference identity also misses the cache.
    DPOTrainer(cfg, config, params, train, str(tmp_path / "d"), held, reference_id="other",
               **QUIET)
    assert calls[-2:] == [32, 16]
