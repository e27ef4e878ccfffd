"""Offline preference data D_offline: hub data sets, local JSONL / Parquet, built-in sets.

Rows come in TRL's formats (`prompt`, `chosen`, `rejected` as strings, or chat message
lists as in HuggingFaceH4/ultrafeedback_binarized) and leave as plain strings: the user's
single-turn instruction and the two assistant replies. Bad rows raise an error naming the
source, the row and the column.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from dice_jax.errors import DiceError

COLUMNS = ("prompt", "chosen", "rejected")
BUILTIN_DIR = os.path.join(os.path.dirname(__file__), "builtin_data")


def normalise_row(row: dict[str, Any], index: int, source: str = "offline data") -> dict:
    """TRL-format row -> {"prompt", "chosen", "rejected"} strings (other keys kept)."""
    for key in COLUMNS:
        if key not in row:
            raise DiceError(f"{source}: row {index} has no {key!r} column")
    out = dict(row)
    prompt = row["prompt"]
    if not isinstance(prompt, str):
        users = [m for m in prompt if m.get("role") == "user"]
        if len(users) != 1 or any(m.get("role") == "assistant" for m in prompt):
            raise DiceError(f"{source}: row {index}: only single-turn prompts are supported")
        out["prompt"] = users[0]["content"]
    for key in ("chosen", "rejected"):
        value = row[key]
        if not isinstance(value, str):
            replies = [m for m in value if m.get("role") == "assistant"]
            if not replies:
                raise DiceError(f"{source}: row {index}: {key!r} has no assistant message")
            out[key] = replies[-1]["content"]
    return out


def _read_local(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        raise DiceError(f"{path}: file not found")
    if path.endswith(".parquet"):
        from datasets import load_dataset

        return list(load_dataset("parquet", data_files=path, split="train"))
    rows = []
    with open(path) as f:
        if path.endswith(".json") and f.read(1) == "[":
            f.seek(0)
            return json.load(f)
        f.seek(0)
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DiceError(f"{path}:{line_no}: not valid JSON ({e})") from None
    return rows


def load_preference_data(source: str, split: str = "train", max_rows: int | None = None,
                         seed: int = 0) -> list[dict[str, Any]]:
    """Loads and normalises D_offline.

    `source`: `builtin:NAME` (shipped with dice-jax), a `.jsonl` / `.json` / `.parquet`
    file, a hub data set id (network needed), or `synthetic:N` (N seeded toy pairs for
    smoke tests). `max_rows` takes a seeded random subset
    (the paper's 10k UltraFeedback subset).
    """
    if source.startswith("synthetic:"):
        rows = synthetic_preferences(_count(source), seed)
    elif source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        path = os.path.join(BUILTIN_DIR, f"{name}.jsonl")
        if not os.path.isfile(path):
            names = os.listdir(BUILTIN_DIR) if os.path.isdir(BUILTIN_DIR) else []
            known = sorted(f[:-6] for f in names if f.endswith(".jsonl"))
            raise DiceError(f"{source}: no such built-in data set; known: {known}")
        rows = _read_local(path)
    elif os.path.exists(source) or source.endswith((".jsonl", ".json", ".parquet")):
        rows = _read_local(source)
    else:
        try:
            from datasets import load_dataset

            rows = list(load_dataset(source, split=split))
        except Exception as e:  # datasets raises many types; all mean "unavailable"
            raise DiceError(f"{source}: cannot load data set split {split!r} "
                            f"({type(e).__name__}: {e})") from None
    if not rows:
        raise DiceError(f"{source}: no rows")
    if max_rows is not None and max_rows < len(rows):
        keep = np.sort(np.random.default_rng(seed).permutation(len(rows))[:max_rows])
        rows = [rows[i] for i in keep]
    return [normalise_row(r, i, source) for i, r in enumerate(rows)]


_TOPICS = ("rivers", "bees", "clocks", "bread", "comets", "maps", "violins", "glaciers",
           "lanterns", "owls", "bridges", "tea", "volcanoes", "kites", "coral", "salt")
_STYLES = ("short", "cheerful", "formal", "simple", "vivid", "calm")


def _count(source: str) -> int:
    text = source.split(":", 1)[1]
    if not text.isdigit() or int(text) < 1:
        raise DiceError(f"{source}: expected synthetic:N with N >= 1")
    return int(text)


def synthetic_preferences(num: int, seed: int) -> list[dict[str, Any]]:
    """`num` toy pairs with distinct prompts: the chosen reply is a plain sentence on the
    topic, the rejected one rambles. For smoke tests of the pipeline, not for learning."""
    rng = np.random.default_rng([seed, num])
    rows = []
    for i in range(num):
        topic = _TOPICS[i % len(_TOPICS)]
        style = _STYLES[int(rng.integers(len(_STYLES)))]
        rows.append({
            "prompt": f"Write a {style} sentence about {topic} (#{i}).",
            "chosen": f"Here is a {style} sentence: {topic} are worth a closer look.",
            "rejected": f"Well, {topic}, {topic}, and more {topic}: " + " ".join(
                rng.choice(list(_TOPICS), size=6)),
        })
    return rows


def split_holdout(rows: list[dict[str, Any]], num_eval: int,
                  seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) with `num_eval` seeded held-out rows (the official code holds 576)."""
    if num_eval >= len(rows):
        raise DiceError(f"cannot hold out {num_eval} evaluation pairs from {len(rows)} rows")
    order = np.random.default_rng(seed).permutation(len(rows))
    held = set(order[:num_eval].tolist())
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])
