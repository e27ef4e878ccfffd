"""Experience replay: `p_Dt = (1 - gamma) p_D(alpha*) + gamma p_Doffline` with the official
code's sizes, offline rows drawn only from prompts the generated pairs do not use."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from dice_jax.data import prompt_text

Row = dict[str, Any]


def replay_sizes(num_offline: int, num_generated: int, gamma: float) -> tuple[int, int]:
    """`(n_gen, n_from_offline)` as the official code computes them.

    `n_gen = min(int(n_off * (1 - gamma)), num_generated)` and
    `n_from_off = int(gamma * n_gen / (1 - gamma))`. gamma = 1 (offline DPO with a new
    reference) uses all offline rows and no generated ones.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma={gamma} must lie in [0, 1]")
    if gamma == 1.0:
        return 0, num_offline
    n_gen = min(int(num_offline * (1 - gamma)), num_generated)
    return n_gen, int(gamma * n_gen / (1 - gamma))


@dataclasses.dataclass(frozen=True)
class ReplayMix:
    rows: list[Row]           # shuffled; each row has "source": "generated" | "offline"
    num_generated: int
    num_offline: int
    offline_shortfall: int    # offline rows wanted but not available on disjoint prompts


def mix_replay(generated: Sequence[Row], offline: Sequence[Row], gamma: float,
               seed: int) -> ReplayMix:
    """Builds D_t from generated pairs and offline pairs (rows with a "prompt" key).

    Generated rows are subsampled to `n_gen`, offline rows are drawn from prompts not used
    by the kept generated rows. Deterministic for a given seed.
    """
    for i, row in enumerate(offline):
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise KeyError(f"offline row {i} has no {key!r} column")
    n_gen, n_off = replay_sizes(len(offline), len(generated), gamma)
    rng = np.random.default_rng(seed)
    gen_idx = rng.permutation(len(generated))[:n_gen]
    kept = [dict(generated[i], source="generated") for i in sorted(gen_idx)]
    used = {prompt_text(r["prompt"]) for r in kept}
    candidates = [i for i, r in enumerate(offline) if prompt_text(r["prompt"]) not in used]
    off_idx = rng.permutation(len(candidates))[:n_off]
    taken = [dict(offline[candidates[j]], source="offline") for j in sorted(off_idx)]
    rows = kept + taken
    order = rng.permutation(len(rows))
    return ReplayMix([rows[i] for i in order], len(kept), len(taken), n_off - len(taken))
