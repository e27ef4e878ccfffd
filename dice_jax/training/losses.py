"""The DPO loss family: one small pure function per loss, plus TRL-named metrics.

Inputs are per-pair log-ratios `log pi(y|x) - log pi_ref(y|x)`, float32 `[pairs]`; every loss
returns per-pair losses `[pairs]` (the caller averages). Beta is applied exactly once, inside
each loss (MaxText's old DPO applied it twice; `tests/test_losses.py` guards against that).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "kto_pair")
LOSS_ALIASES = {"kto": "kto_pair"}  # the paper's Table 3 name


def canonical_loss_type(name: str) -> str:
    """A loss name or alias as one of LOSS_TYPES (unknown names are returned unchanged)."""
    return LOSS_ALIASES.get(name, name)


def sigmoid_loss(chosen_logratios: Array, rejected_logratios: Array, beta: float,
                 label_smoothing: float = 0.0) -> Array:
    """DPO, paper Eq. 3, with optional conservative-DPO label smoothing eps (cDPO / TRL).

    `h = (logpi_w - logref_w) - (logpi_l - logref_l)`;
    `L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)`. Shapes `[P] -> [P]`.
    """
    z = beta * (chosen_logratios - rejected_logratios)
    return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z)
            - label_smoothing * jax.nn.log_sigmoid(-z))


def ipo_loss(chosen_logratios: Array, rejected_logratios: Array, beta: float) -> Array:
    """IPO (Azar et al. 2023, Eq. 17 as TRL implements it): `L = (h - 1/(2 beta))^2`.

    The log-ratios must be LENGTH-AVERAGED (sum of token log-probs / response tokens), as
    IPO's authors and TRL define it; the caller passes averaged values. Shapes `[P] -> [P]`.
    """
    h = chosen_logratios - rejected_logratios
    return (h - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(chosen_logratios: Array, rejected_logratios: Array, beta: float) -> Array:
    """SLiC-HF hinge (Zhao et al. 2023, as TRL's `hinge`): `L = relu(1 - beta h)`.

    Shapes `[P] -> [P]`.
    """
    return jax.nn.relu(1.0 - beta * (chosen_logratios - rejected_logratios))


def kto_pair_loss(chosen_logratios: Array, rejected_logratios: Array, beta: float) -> Array:
    """Paired KTO (Ethayarajh et al. 2024, Eq. 7; TRL's `kto_pair`).

    The reference point `z0` is a batch estimate of KL(pi || pi_ref) from MISMATCHED
    responses: for the chosen half it is the mean log-ratio of the rejected responses and
    vice versa, clamped at 0 and not differentiated (KTO paper: no gradient through z0).
    `L = [(1 - sigmoid(beta (r_w - z0_l))) + (1 - sigmoid(beta (z0_w - r_l)))] / 2` per pair,
    so its batch mean equals TRL's mean over the concatenated 2P terms. The estimate is
    per (micro-)batch. Shapes `[P] -> [P]`.
    """
    kl_chosen = jax.lax.stop_gradient(jnp.maximum(jnp.mean(chosen_logratios), 0.0))
    kl_rejected = jax.lax.stop_gradient(jnp.maximum(jnp.mean(rejected_logratios), 0.0))
    desirable = 1.0 - jax.nn.sigmoid(beta * (chosen_logratios - kl_rejected))
    undesirable = 1.0 - jax.nn.sigmoid(beta * (kl_chosen - rejected_logratios))
    return 0.5 * (desirable + undesirable)


def pair_logps(logps: Array, counts: Array, loss_type: str) -> Array:
    """The log-probs a loss works on: sums, or per-token averages for IPO. `[...]`."""
    if loss_type == "ipo":
        return logps / jnp.maximum(counts, 1).astype(logps.dtype)
    return logps


def dpo_loss(policy_chosen: Array, policy_rejected: Array, reference_chosen: Array,
             reference_rejected: Array, *, loss_type: str, beta: float,
             label_smoothing: float = 0.0) -> tuple[Array, dict[str, Array]]:
    """Per-pair losses `[P]` and per-pair metric values (TRL names), all float32 `[P]`.

    All inputs are float32 `[P]` log-probs already reduced for this loss (see `pair_logps`).
    Rewards are `beta * (policy - reference)` on those same values, as in TRL.
    """
    chosen = policy_chosen - reference_chosen
    rejected = policy_rejected - reference_rejected
    if loss_type == "sigmoid":
        losses = sigmoid_loss(chosen, rejected, beta, label_smoothing)
    elif loss_type == "ipo":
        losses = ipo_loss(chosen, rejected, beta)
    elif loss_type == "hinge":
        losses = hinge_loss(chosen, rejected, beta)
    elif loss_type == "kto_pair":
        losses = kto_pair_loss(chosen, rejected, beta)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: {LOSS_TYPES}")
    reward_chosen = beta * jax.lax.stop_gradient(chosen)
    reward_rejected = beta * jax.lax.stop_gradient(rejected)
    metrics = {
        "loss": losses,
        "rewards/chosen": reward_chosen,
        "rewards/rejected": reward_rejected,
        "rewards/margins": reward_chosen - reward_rejected,
        "rewards/accuracies": (reward_chosen > reward_rejected).astype(jnp.float32),
        "logps/chosen": jax.lax.stop_gradient(policy_chosen),
        "logps/rejected": jax.lax.stop_gradient(policy_rejected),
    }
    return losses, metrics
