"""Writes a round's data stage: JSONL that `datasets.load_dataset("json", ...)` and TRL
read, `stats.json`, and the two PNG figures, all into a folder created atomically."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dice_jax.dice.builder import RoundData
from dice_jax.dice.plots import plot_alpha_landscape, plot_length_gap
from dice_jax.dice.rewards import length_gap_objective
from dice_jax.fileio import (
    atomic_directory,
    write_json,
    write_jsonl,
)

SAMPLES_FILE = "samples.jsonl"   # every (prompt, response) with log-probs and rewards
PAIRS_FILE = "pairs.jsonl"       # D(alpha*)
MIXED_FILE = "mixed.jsonl"       # D_t: D(alpha*) mixed with replayed offline pairs
STATS_FILE = "stats.json"


def write_round_data(data: RoundData, destination: str) -> str:
    """Writes `destination/` (must not exist) with all files of the stage, or nothing."""
    with atomic_directory(destination) as tmp:
        write_round_files(data, tmp)
    return destination


def write_round_files(data: RoundData, folder: str) -> None:
    """Writes the data stage's files into an existing (temporary) `folder`."""
    write_jsonl(os.path.join(folder, SAMPLES_FILE), data.samples)
    write_jsonl(os.path.join(folder, PAIRS_FILE), data.pairs)
    write_jsonl(os.path.join(folder, MIXED_FILE), data.mixed)
    unit = data.stats["length_unit"]
    plot_length_gap(data.gaps_before, data.gaps_after, data.search.alpha, unit,
                    os.path.join(folder, "length_gap.png"))
    name = data.stats["alpha_search"]["objective"]

    def objective(alpha: float) -> float:
        return float(length_gap_objective(np.float32(alpha), data.reward, data.lengths,
                                          data.valid, objective=name))

    plot_alpha_landscape(objective, list(data.search.trace), data.search.alpha, name,
                         data.search.method, os.path.join(folder, "alpha_search.png"))
    stats = dict(data.stats, alpha_trace=[list(t) for t in data.search.trace])
    write_json(os.path.join(folder, STATS_FILE), _json_safe(stats))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None  # JSON has no inf/nan
    return obj
