"""The run configuration: one typed schema built from the components' own settings.

`RunConfig` nests the components' dataclasses as its sections, so every key is declared
once, on the field that the math reads:

    model     ModelSettings    (this module)       which weights, dtypes, chat template
    mesh      MeshConfig       (this module)       data / fsdp / tensor axis sizes
    data      DataConfig       (this module)       D_offline and the held-out pairs
    sampling  SamplingConfig   (sampling.config)   K, temperature, top-p, limits, cache
    dice      DiceDataConfig   (dice.builder)      reward scale, filters, alpha* search, replay
    train     TrainConfig      (training.config)   DPO loss, beta, optimizer, steps
    eval      EvalConfig       (evaluation)        held-out prompts and modes

A config file (`configs/*.py`) defines `get_config()` returning a `RunConfig` with its
changes; the command line (`dice_jax.cli`, on ml_collections' config_flags) applies
`--config.a.b=VALUE` overrides to it, then `validate` checks every field against its
declaration and the few rules that span sections, raising ConfigError naming the key.
The paper's beta is `train.beta`; the implicit reward uses it too (`dice.reward_scale`).
"""

import dataclasses
from typing import Any

from dice_jax.dice.builder import DiceDataConfig
from dice_jax.errors import ConfigError
from dice_jax.evaluation import EvalConfig
from dice_jax.sampling.config import SamplingConfig
from dice_jax.settings import check_managed, check_settings, section, setting
from dice_jax.training.config import TrainConfig

METHODS = ("dice", "offline_dpo", "offline_dpo_new_ref", "llm_judge")
DTYPES = ("float32", "bfloat16")


@section
class ModelSettings:
    """The start policy and reference, and how they are computed."""

    policy: str = setting("embedded:smollm2", "pi_theta(0): HF folder, hub id, .gguf, "
                          "dice-jax checkpoint, embedded:NAME or random:PRESET")
    reference: str | None = setting(None, "pi_ref(0) (None: the policy itself)")
    dtype: str = setting("float32", "compute dtype", choices=DTYPES)
    param_dtype: str = setting("float32", "master-weight dtype", choices=DTYPES)
    remat: bool = setting(False, "recompute each layer in the backward pass")
    chat_template: str | None = setting(None, "None: the tokenizer's; a name in "
                                        "dice_jax.chat_templates; or a Jinja string")


@section
class MeshConfig:
    """Device mesh axis sizes; one of them may be -1 (all remaining devices)."""

    data: int = setting(1, "data-parallel axis (batch)", min=-1)
    fsdp: int = setting(-1, "fully sharded axis (batch and parameters)", min=-1)
    tensor: int = setting(1, "tensor-parallel axis (heads, MLP, vocabulary)", min=-1)

    def check(self) -> None:
        sizes = self.as_dict()
        if list(sizes.values()).count(-1) > 1 or 0 in sizes.values():
            raise ConfigError(f"config.mesh: {sizes}: sizes must be >= 1, at most one -1")

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def check_devices(self, device_count: int) -> None:
        """Raises unless the mesh can be laid out on `device_count` devices."""
        sizes = self.as_dict()
        known = 1
        for size in sizes.values():
            known *= size if size != -1 else 1
        fits = device_count % known == 0 if -1 in sizes.values() else known == device_count
        if not fits:
            raise ConfigError(f"config.mesh: {sizes} does not match the {device_count} "
                              "available device(s)")


@section
class DataConfig:
    """D_offline: the preference pairs of round 0, replay and the prompts DICE samples."""

    offline: str = setting("builtin:smollm2", "hub id, JSONL/Parquet path, builtin:NAME or "
                           "synthetic:N")
    offline_split: str = setting("train_prefs", "split of a hub data set")
    max_prompts: int | None = setting(None, "a seeded subset of this many prompts (None: "
                                      "all)", min=1)
    eval_pairs: int = setting(576, "held-out DPO validation pairs (official: 576)", min=0)


def paper_sampling() -> SamplingConfig:
    """The paper's sampling settings (K=16, T=0.7, top-p 0.9, 2048 new tokens)."""
    return SamplingConfig(num_samples=16, temperature=0.7, top_p=0.9, max_new_tokens=2048,
                          max_prompt_tokens=2048, cache_budget_gb=16.0)


@section
class RunConfig:
    """A DICE run (Algorithm 1) or one of the paper's baselines, with the paper's
    defaults where it gives them (docs/method.md)."""

    run_dir: str = setting("runs/dice", "the run folder (resumed when it exists)")
    method: str = setting("dice", "dice | offline_dpo | offline_dpo_new_ref | llm_judge",
                          choices=METHODS)
    rounds: int = setting(2, "DICE rounds after the optional round 0", min=0)
    round0: bool = setting(False, "offline DPO on D_offline first (a start model that is "
                           "not DPO-tuned)")
    seed: int = setting(0, "the run's seed; each round derives its own from it")
    export_hf_each_round: bool = setting(False, "an HF folder after every round")
    model: ModelSettings = setting(factory=ModelSettings, help="weights and numerics")
    mesh: MeshConfig = setting(factory=MeshConfig, help="device mesh")
    data: DataConfig = setting(factory=DataConfig, help="D_offline")
    sampling: SamplingConfig = setting(factory=paper_sampling, help="K samples per prompt")
    dice: DiceDataConfig = setting(factory=DiceDataConfig, help="rewards and round data")
    train: TrainConfig = setting(factory=TrainConfig, help="DPO")
    eval: EvalConfig = setting(factory=EvalConfig, help="verifiable-judge evaluation")

    def check(self) -> None:
        """Rules that span sections (each section checks its own fields)."""
        if self.rounds == 0 and not self.round0:
            raise ConfigError("config.rounds: 0 rounds and no round0: nothing to do")
        if self.method == "dice" and not self.round0 and self.model.reference is None:
            raise ConfigError("config.model.reference: DICE scores round 1 with pi_ref(0): "
                              "set model.reference (the model the start policy was "
                              "DPO-tuned from) or round0=True")
        if (self.method == "dice" and self.dice.guard.min_heldout_accuracy > 0
                and self.data.eval_pairs == 0):
            raise ConfigError("config.dice.guard.min_heldout_accuracy: the guard measures the "
                              "implicit reward on held-out pairs, but data.eval_pairs is 0; "
                              "hold some out or set the guard to 0")
        k = self.sampling.num_samples
        if k < 2:
            raise ConfigError(f"config.sampling.num_samples: K={k}; a pair needs at least 2 "
                              "samples")
        if self.dice.filters.min_valid > k:
            raise ConfigError(f"config.dice.filters.min_valid: "
                              f"{self.dice.filters.min_valid} must lie in [2, K={k}]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate(config: RunConfig, device_count: int | None = None) -> RunConfig:
    """Checks every setting once (types, ranges, cross-section rules, the mesh against
    `device_count`); raises ConfigError naming the first bad key. Returns `config`."""
    if not isinstance(config, RunConfig):
        raise ConfigError(f"the config must be a RunConfig, not {type(config).__name__} "
                          "(get_config() should start from dice_jax.config.RunConfig())")
    check_settings(config)
    check_managed(config)
    if device_count is not None:
        config.mesh.check_devices(device_count)
    return config
