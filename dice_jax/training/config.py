"""Training configuration: one settings dataclass, defaults from the DICE paper's DPO rounds."""

import dataclasses
from typing import Any

from dice_jax.errors import ConfigError
from dice_jax.settings import check_settings, section, setting
from dice_jax.training.losses import LOSS_ALIASES, LOSS_TYPES, canonical_loss_type

TRUNCATION_MODES = ("keep_end", "keep_start")


@section
class TrainConfig:
    """DPO training settings (the run config's `train` section).

    Batch sizes count PAIRS. `batch_size` is the global batch of one optimizer step; it is
    split into `grad_accum` micro-batches of `batch_size // grad_accum` pairs each, and the
    micro-batch is split over the mesh's `data` x `fsdp` devices. Fields marked `step=True`
    are the ones the compiled train / eval / log-prob programs read (their cache key).
    Paper defaults: beta 0.1, lr 5e-7 constant, AdamW with weight decay 0, clip 1.0,
    global batch 32, max length 4096, 300 steps per round, eval every 20 steps.
    """

    beta: float = setting(0.1, "the paper's beta: DPO loss (Eq. 3) and implicit reward "
                          "(Eq. 4)", above=0, step=True)
    loss_type: str = setting("sigmoid", "sigmoid (DPO) | ipo | hinge | kto_pair ('kto' is "
                             "read as kto_pair)", choices=(*LOSS_TYPES, *LOSS_ALIASES), step=True)
    label_smoothing: float = setting(0.0, "cDPO eps, sigmoid loss only", min=0, below=0.5,
                                     step=True)
    learning_rate: float = setting(5e-7, "AdamW learning rate (constant after warm-up)",
                                   above=0, step=True)
    warmup_steps: int = setting(0, "linear warm-up steps from 0 (the official constant "
                                "scheduler has none)", min=0, step=True)
    max_steps: int = setting(300, "optimizer steps per round", min=1)
    batch_size: int = setting(32, "pairs per optimizer step (global)", min=1, step=True)
    grad_accum: int = setting(1, "micro-batches per step; must divide batch_size", min=1,
                              step=True)
    eval_batch_size: int | None = setting(None, "pairs per evaluation batch (None: the "
                                          "micro-batch size)", min=1)
    adam_b1: float = setting(0.9, "AdamW beta1", min=0, below=1, step=True)
    adam_b2: float = setting(0.999, "AdamW beta2", min=0, below=1, step=True)
    adam_eps: float = setting(1e-8, "AdamW epsilon", above=0, step=True)
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay", min=0, step=True)
    max_grad_norm: float = setting(1.0, "global gradient-norm clip", above=0, step=True)
    max_length: int = setting(4096, "prompt + response tokens per sequence", min=2)
    max_prompt_length: int = setting(2048, "prompt tokens kept (< max_length)", min=1)
    truncation_mode: str = setting("keep_end", "keep_end drops a long prompt's start (TRL "
                                   "default); keep_start its end", choices=TRUNCATION_MODES)
    pad_to_multiple: int = setting(64, "sequences padded to a multiple (fewer shapes)",
                                   min=1)
    logits_chunk: int = setting(64, "scored positions per vocabulary-projection chunk",
                                min=1, step=True)
    shared_prompt: bool = setting(True, "run each pair's prompt through the model once, its "
                                  "KV cache shared by chosen and rejected")
    eval_every: int = setting(20, "held-out evaluation every N steps (0: never)", min=0)
    save_every: int = setting(50, "checkpoint every N steps (0: only at the end)", min=0)
    keep_checkpoints: int = setting(2, "checkpoints kept while training", min=1)
    seed: int = setting(0, "data order", managed="config.seed (each round derives its own)")

    def __post_init__(self) -> None:
        check_settings(self, "train.")

    def check(self) -> None:
        """Cross-field checks (single-field ranges are declared on the fields)."""
        self.loss_type = canonical_loss_type(self.loss_type)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"config.train.grad_accum: batch_size={self.batch_size} is not "
                              f"divisible by grad_accum={self.grad_accum}")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"config.train.max_prompt_length: {self.max_prompt_length} "
                              f"must be below max_length={self.max_length}")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    def step_key(self) -> tuple[tuple[str, Any], ...]:
        """The values of the fields the compiled steps read (`step=True`)."""
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                     if f.metadata.get("step"))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
