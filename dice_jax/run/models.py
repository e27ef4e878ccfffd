"""Which weights each round uses, loaded once and kept on the run's device mesh.

Algorithm 1 names four models per round t: the policy pi_theta(t-1) (sampled from, scored,
trained from) and the reference pi_ref(t-1) (scoring only). With round 0 (offline DPO from
the start model) they are:

    pi_theta(0) = round_0/train/policy     pi_ref(0) = model.reference or model.policy
    pi_theta(t) = round_t/train/policy     pi_ref(t) = pi_theta(t-1)

and without round 0, pi_theta(0) = model.policy and pi_ref(0) = model.reference. A trained
policy is handed over in memory (`remember`), so an uninterrupted run never reloads what it
just wrote; after a restart it comes from its checkpoint. At most two parameter sets are
held at once.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import jax
from jax.sharding import Mesh

from dice_jax.chat_templates import apply_chat_template
from dice_jax.checkpoints import load_model, resolve_source
from dice_jax.checkpoints.orbax_io import read_checkpoint_config
from dice_jax.config import RunConfig
from dice_jax.distributed import put_global
from dice_jax.errors import DiceError
from dice_jax.models.config import ModelConfig
from dice_jax.run.folder import RunFolder
from dice_jax.sharding import param_shardings

POLICY_DIR = "policy"


class RoundModels:
    """Loads, places and caches the policy / reference weights of every round."""

    def __init__(self, config: RunConfig, folder: RunFolder, mesh: Mesh,
                 capacity: int = 2) -> None:
        self.config, self.folder, self.mesh = config, folder, mesh
        self.capacity = capacity
        self._cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.model_config: ModelConfig | None = None
        self.tokenizer: Any = None
        self._overrides = {"dtype": config.model.dtype,
                           "param_dtype": config.model.param_dtype,
                           "remat": config.model.remat}

    # ------------------------------------------------------------------ sources
    def trained_policy(self, round_index: int) -> str:
        return os.path.join(self.folder.path(f"round_{round_index}/train"), POLICY_DIR)

    def policy_source(self, t: int) -> str:
        """Where pi_theta(t) lives."""
        if t == 0:
            return (self.trained_policy(0) if self.config.round0
                    else self.config.model.policy)
        return self.trained_policy(t)

    def reference_source(self, t: int) -> str:
        """Where pi_ref(t) lives."""
        if t == 0:
            return self.config.model.reference or self.config.model.policy
        return self.policy_source(t - 1)

    # ------------------------------------------------------------------ loading
    def _known_config(self, source: str) -> ModelConfig | None:
        """The model config without loading weights, where the source has one."""
        kind, path = resolve_source(source)
        if kind == "dice":
            return read_checkpoint_config(path).replace(**self._overrides)
        if kind == "random":  # initialised straight onto the mesh, on every process
            from dice_jax.checkpoints.random_init import random_config

            return random_config(path, **self._overrides)
        if kind == "hf":
            return ModelConfig.from_hf_file(os.path.join(path, "config.json")).replace(
                **self._overrides)
        return None

    def load(self, source: str) -> Any:
        """Params of `source`, placed per the training shardings (cached)."""
        if source in self._cache:
            self._cache.move_to_end(source)
            return self._cache[source]
        known = self.model_config or self._known_config(source)
        shardings = None if known is None else param_shardings(known, self.mesh)
        loaded = load_model(source, shardings=shardings,
                            with_tokenizer=self.tokenizer is None, **self._overrides)
        if self.model_config is None:
            self.model_config = loaded.config
            tokenizer = loaded.tokenizer
            if tokenizer is None:
                raise DiceError(f"{source}: no tokenizer found beside the weights")
            self.tokenizer = apply_chat_template(tokenizer, self.config.model.chat_template)
        elif _shape_key(loaded.config) != _shape_key(self.model_config):
            raise DiceError(f"{source}: architecture differs from the run's policy "
                            f"({loaded.config.model_type}, {loaded.config.num_layers} "
                            "layers ...); policy and reference must share one")
        params = loaded.params
        if shardings is None:  # host (or one-device) weights: each process places its shards
            params = jax.tree.map(put_global, params,
                                  param_shardings(self.model_config, self.mesh))
        self.remember(source, params)
        return params

    def remember(self, source: str, params: Any) -> None:
        """Keeps `params` as the weights of `source` (e.g. a policy just trained)."""
        self._cache[source] = params
        self._cache.move_to_end(source)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)

    def forget(self, source: str) -> None:
        self._cache.pop(source, None)

    def policy(self, t: int) -> Any:
        return self.load(self.policy_source(t))

    def reference(self, t: int) -> Any:
        return self.load(self.reference_source(t))

    def ensure_loaded(self) -> None:
        """Loads the start policy if nothing is loaded yet (sets config and tokenizer)."""
        if self.model_config is None:
            self.load(self.config.model.policy)


def _shape_key(config: ModelConfig) -> tuple:
    return (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.vocab_size)
