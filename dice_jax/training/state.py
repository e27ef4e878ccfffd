"""Optimizer, train state and their shardings on a device mesh.

The optimizer state is sharded exactly like the parameters (Adam's `mu` and `nu` copy each
parameter's NamedSharding); scalars (step counters) are replicated. Everything here works on
abstract shapes too, so the memory plan can use it without allocating.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dice_jax.models.config import ModelConfig
from dice_jax.sharding import DEFAULT_RULES, Rules, param_shapes, param_shardings, replicated
from dice_jax.training.config import TrainConfig


@flax.struct.dataclass
class TrainState:
    """`step`: optimizer updates done (int32 scalar); `params`: float32 master weights
    (`ModelConfig.param_dtype`); `opt_state`: the optax state, sharded like `params`."""

    step: jax.Array
    params: Any
    opt_state: Any


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then constant `learning_rate` (the HF
    `constant_with_warmup` rule: step s < warmup gets lr * s / warmup)."""
    if cfg.warmup_steps == 0:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
         optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (weight decay 0 by default, as in the paper)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2,
                    eps=cfg.adam_eps, weight_decay=cfg.weight_decay))


def opt_state_like_params(optimizer: optax.GradientTransformation, opt_state: Any,
                          param_tree: Any, non_param: Any) -> Any:
    """Maps each params-shaped subtree of `opt_state` to `param_tree`, every other leaf
    (counters) to `non_param`."""
    return optax.tree_utils.tree_map_params(
        optimizer, lambda _, value: value, opt_state, param_tree,
        transform_non_params=lambda _: non_param)


def abstract_train_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                         params_abstract: Any) -> TrainState:
    """`jax.ShapeDtypeStruct`s of a TrainState (nothing allocated)."""
    return jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                               opt_state=optimizer.init(p)), params_abstract)


def train_state_shardings(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                          mesh: Mesh, rules: Rules = DEFAULT_RULES) -> TrainState:
    """A NamedSharding per TrainState leaf: params by the rule table, optimizer state like
    params, the step replicated."""
    p_shard = param_shardings(model_config, mesh, rules)
    abstract = abstract_train_state(model_config, optimizer, param_shapes(model_config))
    return TrainState(step=replicated(mesh), params=p_shard,
                      opt_state=opt_state_like_params(optimizer, abstract.opt_state, p_shard,
                                                      replicated(mesh)))


def init_train_state(params: Any, optimizer: optax.GradientTransformation,
                     shardings: TrainState) -> TrainState:
    """A fresh TrainState at step 0 placed on `shardings` (params are copied, not donated)."""
    params = jax.device_put(params, shardings.params)
    init = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                        opt_state=optimizer.init(p)), out_shardings=shardings)
    return init(params)

