"""The DICE reward equations and pair selection, as small pure jitted functions.

Shapes: P prompts, K responses per prompt. `valid [P, K]` marks responses that survived the
filters; invalid responses never become chosen or rejected.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("scaled",))
def implicit_reward(logp_policy: Array, logp_reference: Array, beta: float,
                    scaled: bool = True) -> Array:
    """Eq. 4: `r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))`, shape `[P, K]`.

    `logp_*` are sequence log-probs summed over response tokens, float `[P, K]`.
    `scaled=False` gives the official code's convention, which drops the beta factor
    (alpha is then on that unscaled scale).
    """
    ratio = logp_policy.astype(jnp.float32) - logp_reference.astype(jnp.float32)
    return beta * ratio if scaled else ratio


@jax.jit
def length_regularized_reward(reward: Array, lengths: Array, alpha: float | Array) -> Array:
    """Eq. 8: `r_LR(x, y; alpha) = r(x, y) - alpha * |y|`, shape `[P, K]`.

    `lengths [P, K]` in characters (paper and official code) or tokens.
    """
    return reward - alpha * lengths.astype(jnp.float32)


@jax.jit
def select_pairs(shaped_reward: Array, valid: Array) -> tuple[Array, Array, Array]:
    """D(alpha): per prompt, chosen = argmax_k r_LR, rejected = argmin_k r_LR over valid k.

    Returns `(chosen [P] int32, rejected [P] int32, is_pair [P] bool)`. A prompt is not a
    pair when fewer than two responses are valid or the best and worst rewards tie. Among
    equal rewards the lowest index wins, so results do not depend on hardware.
    """
    valid = valid.astype(bool)
    best = jnp.argmax(jnp.where(valid, shaped_reward, -jnp.inf), axis=-1)
    worst = jnp.argmin(jnp.where(valid, shaped_reward, jnp.inf), axis=-1)
    top = jnp.take_along_axis(shaped_reward, best[:, None], axis=-1)[:, 0]
    bottom = jnp.take_along_axis(shaped_reward, worst[:, None], axis=-1)[:, 0]
    is_pair = (valid.sum(-1) >= 2) & (top > bottom)
    return best.astype(jnp.int32), worst.astype(jnp.int32), is_pair


@functools.partial(jax.jit, static_argnames=("objective",))
def length_gap_objective(alpha: float | Array, reward: Array, lengths: Array, valid: Array,
                         objective: str = "mean_abs") -> Array:
    """Eq. 9's objective for one alpha: the length gap of D(alpha), a float32 scalar.

    `objective="mean_abs"`: `E | |y_w| - |y_l| |` (Eq. 9 as written);
    `objective="abs_mean"`: `| E (|y_w| - |y_l|) |` (the official code). The expectation
    runs over the prompts that form a pair at this alpha; with no pair the value is +inf.
    """
    chosen, rejected, is_pair = select_pairs(
        length_regularized_reward(reward, lengths, alpha), valid)
    lengths = lengths.astype(jnp.float32)
    gap = (jnp.take_along_axis(lengths, chosen[:, None], -1)
           - jnp.take_along_axis(lengths, rejected[:, None], -1))[:, 0]
    n = is_pair.sum()
    if objective == "mean_abs":
        value = jnp.sum(jnp.where(is_pair, jnp.abs(gap), 0.0)) / jnp.maximum(n, 1)
    elif objective == "abs_mean":
        value = jnp.abs(jnp.sum(jnp.where(is_pair, gap, 0.0)) / jnp.maximum(n, 1))
    else:
        raise ValueError(f"objective must be 'mean_abs' or 'abs_mean', got {objective!r}")
    return jnp.where(n > 0, value, jnp.inf)


@jax.jit
def mean_length_gap(lengths: Array, chosen: Array, rejected: Array, is_pair: Array) -> Array:
    """Signed mean `E(|y_w| - |y_l|)` over pairs, float32 scalar (for reports)."""
    lengths = lengths.astype(jnp.float32)
    gap = (jnp.take_along_axis(lengths, chosen[:, None], -1)
           - jnp.take_along_axis(lengths, rejected[:, None], -1))[:, 0]
    return jnp.sum(jnp.where(is_pair, gap, 0.0)) / jnp.maximum(is_pair.sum(), 1)
