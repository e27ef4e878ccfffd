"""Training configuration: one frozen dataclass, defaults from the DICE paper's DPO rounds."""

from __future__ import annotations

import dataclasses
from typing import Any

from dice_jax.training.losses import LOSS_TYPES

TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """DPO training settings.

    Batch sizes count PAIRS. `batch_size` is the global batch of one optimizer step; it is
    split into `grad_accum` micro-batches of `batch_size // grad_accum` pairs each, and the
    micro-batch is split over the mesh's `data` x `fsdp` devices.
    Paper defaults: beta 0.1, lr 5e-7 constant, AdamW with weight decay 0, clip 1.0,
    global batch 32, max length 4096, 300 steps per round, eval every 20 steps.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"          # sigmoid | ipo | hinge | kto_pair
    label_smoothing: float = 0.0        # cDPO eps, sigmoid loss only
    learning_rate: float = 5e-7
    warmup_steps: int = 0               # linear warm-up from 0, then constant
    max_steps: int = 300
    batch_size: int = 32
    grad_accum: int = 1
    eval_batch_size: int | None = None  # default: the micro-batch size
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 4096              # prompt + response, tokens
    max_prompt_length: int = 2048
    truncation_mode: str = "keep_end"   # keep_end: drop the prompt's START (TRL default)
    pad_to_multiple: int = 64           # sequences padded to a multiple (fewer shapes)
    logits_chunk: int = 64              # scored positions per vocabulary-projection chunk
    shared_prompt: bool = True          # run each pair's prompt once (training.logprobs)
    eval_every: int = 20                # 0: never
    save_every: int = 50                # 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 0                       # data order
    mesh: tuple[tuple[str, int], ...] = (("data", 1), ("fsdp", -1), ("tensor", 1))

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}; known: {LOSS_TYPES}")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode={self.truncation_mode!r}; "
                             f"known: {TRUNCATION_MODES}")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be a positive multiple of "
                             f"grad_accum={self.grad_accum}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} must be below "
                             f"max_length={self.max_length}")
        if min(self.max_steps, self.logits_chunk, self.pad_to_multiple) < 1:
            raise ValueError("max_steps, logits_chunk and pad_to_multiple must be >= 1")
        if min(self.warmup_steps, self.eval_every, self.save_every) < 0:
            raise ValueError("warmup_steps, eval_every and save_every must be >= 0")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def mesh_axes(self) -> dict[str, int]:
        return dict(self.mesh)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mesh"] = dict(self.mesh)
        return d
