"""The jitted DPO train step (gradient accumulation by `lax.scan`), eval and log-prob steps.

A train batch is a dict of host arrays with a leading micro-batch axis: the pairs'
tokens in either layout of `dice_jax.training.logprobs` (`input_ids`, `attention_mask`,
`loss_mask` int32 `[grad_accum, micro, 2, length]`, or the shared-prompt `prompt_ids`,
`prompt_mask` `[grad_accum, micro, prompt_len]` and `response_ids`, `response_mask`
`[grad_accum, micro, 2, response_len]`) and `ref_logps` float32 `[grad_accum, micro, 2]`
(cached reference log-prob sums). Axis 1 (pairs) is sharded over the mesh's batch axes.
Metrics (TRL names) are means over all pairs of the step; `grad_norm` is the global norm
before clipping.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dice_jax.models.config import ModelConfig
from dice_jax.sharding import DEFAULT_RULES, MeshFunction, Rules, replicated
from dice_jax.training.config import TrainConfig
from dice_jax.training.logprobs import pair_logprobs
from dice_jax.training.losses import dpo_loss, pair_logps
from dice_jax.training.state import TrainState, learning_rate_schedule

Array = jax.Array
Batch = dict[str, Array]


def pair_losses(params: Any, batch: Batch, model_config: ModelConfig,
                cfg: TrainConfig) -> tuple[Array, dict[str, Array]]:
    """Per-pair losses `[P]` and per-pair metrics for one micro-batch `[P, 2, length]`."""
    logps, counts = pair_logprobs(params, model_config, batch, cfg.logits_chunk)
    policy = pair_logps(logps, counts, cfg.loss_type)
    reference = pair_logps(batch["ref_logps"].astype(jnp.float32), counts, cfg.loss_type)
    return dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1],
                    loss_type=cfg.loss_type, beta=cfg.beta,
                    label_smoothing=cfg.label_smoothing)


def micro_batch_loss(params: Any, batch: Batch, model_config: ModelConfig,
                     cfg: TrainConfig) -> tuple[Array, dict[str, Array]]:
    """Mean loss (scalar) and mean metrics of one micro-batch."""
    losses, metrics = pair_losses(params, batch, model_config, cfg)
    return jnp.mean(losses), {k: jnp.mean(v) for k, v in metrics.items()}


def train_step(state: TrainState, batch: Batch, *, model_config: ModelConfig,
               cfg: TrainConfig, optimizer: optax.GradientTransformation,
               grad_shardings: Any = None) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer step over `grad_accum` micro-batches (pure; jit it).

    Gradients are averaged over micro-batches in float32 (equal micro-batch sizes, so the
    result equals one big batch). A non-finite loss or gradient norm leaves the state
    unchanged and reports `finite = 0`.
    """
    grad_fn = jax.value_and_grad(micro_batch_loss, has_aux=True)
    accum = batch["ref_logps"].shape[0]

    def one(micro: Batch) -> tuple[Any, dict[str, Array]]:
        (_, metrics), grads = grad_fn(state.params, micro, model_config, cfg)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        return grads, metrics

    if accum == 1:
        grads, metrics = one(jax.tree.map(lambda x: x[0], batch))
    else:
        def body(carry: Any, micro: Batch) -> tuple[Any, None]:
            grads, metrics = one(micro)
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None

        zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
            lambda: one(jax.tree.map(lambda x: x[0], batch))[1]))
        zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        if grad_shardings is not None:
            zero_grads = jax.lax.with_sharding_constraint(zero_grads, grad_shardings)
        (grads, metrics), _ = jax.lax.scan(body, (zero_grads, zero_metrics), batch)
        grads = jax.tree.map(lambda g: g / accum, grads)
        metrics = jax.tree.map(lambda m: m / accum, metrics)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

    def apply(state: TrainState) -> TrainState:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state.params, updates)
        # bfloat16 master weights get bfloat16 Adam moments (`optimizer.init`, and the
        # memory plan, follow the params): the float32 gradients promote the update's
        # arithmetic to float32, and the moments are stored back in their own dtype.
        opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state,
                                 state.opt_state)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state)

    # A branch, not a select: the update is computed once, and only when it is finite.
    new = jax.lax.cond(finite, apply, lambda state: state, state)
    metrics = dict(metrics, grad_norm=grad_norm, finite=finite.astype(jnp.float32),
                   learning_rate=jnp.asarray(learning_rate_schedule(cfg)(state.step),
                                             jnp.float32))
    return new, metrics


def make_train_step(model_config: ModelConfig, cfg: TrainConfig,
                    optimizer: optax.GradientTransformation, mesh: Mesh,
                    state_shardings: TrainState, rules: Rules = DEFAULT_RULES) -> MeshFunction:
    """`step(state, batch) -> (state, metrics)`, jitted on `mesh`, the state donated."""
    fn = functools.partial(train_step, model_config=model_config, cfg=cfg, optimizer=optimizer,
                           grad_shardings=state_shardings.params)
    return MeshFunction(fn, mesh, rules, out_shardings=(state_shardings, replicated(mesh)),
                        donate_argnums=0)


def make_eval_step(model_config: ModelConfig, cfg: TrainConfig, mesh: Mesh,
                   rules: Rules = DEFAULT_RULES) -> MeshFunction:
    """`eval(params, batch [P, 2, length]) -> per-pair metrics [P]` (TRL names)."""
    def fn(params: Any, batch: Batch) -> dict[str, Array]:
        return pair_losses(params, batch, model_config, cfg)[1]
    return MeshFunction(fn, mesh, rules, out_shardings=replicated(mesh))


def make_logps_step(model_config: ModelConfig, cfg: TrainConfig, mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> MeshFunction:
    """`logps(params, batch [P, 2, length]) -> (sums [P, 2], counts [P, 2])`."""
    def fn(params: Any, batch: Batch) -> tuple[Array, Array]:
        return pair_logprobs(params, model_config, batch, cfg.logits_chunk)
    return MeshFunction(fn, mesh, rules, out_shardings=replicated(mesh))
