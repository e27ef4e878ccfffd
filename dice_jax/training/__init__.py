"""DPO training on a device mesh: log-probs, the DPO loss family, the train step, the loop.

    from dice_jax.training import DPOTrainer, TrainConfig, tokenize_pairs

    data, stats = tokenize_pairs(rows, tokenizer, max_length=1024, max_prompt_length=512)
    train, held_out = split_pairs(data, eval_size=64)
    trainer = DPOTrainer(TrainConfig(beta=0.1, max_steps=300), config, params, train,
                         workdir, held_out)
    history = trainer.train()          # resumes from workdir/checkpoints when present

Modules: `losses` (pure loss functions), `logprobs` (chunked response log-probs), `scoring`
(batched, sharded, packed log-probs of many (prompt, response) sequences), `data` (tokenise,
truncate, drop-and-count), `state` (optimizer, TrainState, shardings), `step` (jitted train
/ eval steps), `memory` (per-device memory plan + CLI), `loop` (trainer).
"""

from dice_jax.training.config import TrainConfig
from dice_jax.training.data import (
    DataStats,
    PairArrays,
    build_pairs,
    read_rows,
    split_pairs,
    tokenize_pairs,
)
from dice_jax.training.logprobs import pair_logprobs, sequence_logprobs
from dice_jax.training.loop import DPOTrainer
from dice_jax.training.losses import dpo_loss, hinge_loss, ipo_loss, kto_pair_loss, sigmoid_loss
from dice_jax.training.memory import MemoryPlan, memory_plan

__all__ = [
    "DPOTrainer",
    "DataStats",
    "MemoryPlan",
    "PairArrays",
    "TrainConfig",
    "build_pairs",
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "kto_pair_loss",
    "memory_plan",
    "pair_logprobs",
    "read_rows",
    "sequence_logprobs",
    "sigmoid_loss",
    "split_pairs",
    "tokenize_pairs",
]
