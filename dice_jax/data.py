"""Input data: D_offline (hub data sets, local JSONL / Parquet, built-in sets) and the
evaluation prompt sets (`load_eval_prompts`).

Rows come in TRL's formats (`prompt`, `chosen`, `rejected` as strings, or chat message
lists as in HuggingFaceH4/ultrafeedback_binarized) and leave as plain strings: the user's
single-turn instruction and the two assistant replies. Bad rows raise an error naming the
source, the row and the column.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from numbers import Real
from typing import Any

import numpy as np

from dice_jax.errors import DiceError
from dice_jax.fileio import read_json_rows

COLUMNS = ("prompt", "chosen", "rejected")
BUILTIN_DIR = os.path.join(os.path.dirname(__file__), "builtin_data")


def prompt_text(prompt: Any, where: str = "prompt") -> str:
    """The string that identifies a prompt in D_offline, samples.jsonl and pairs.jsonl.

    A string as is; a single-turn chat (one user message, optional system messages, no
    assistant turn) is its user message's content, the form `normalise_row` gives
    D_offline's prompts, so sampled prompts match offline rows (replay keeps their prompts
    disjoint by this string). Anything else (multi-turn chats, token ids) has no such
    string, since DICE trains every pair as one user turn: a DiceError naming `where`.
    """
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(m, Mapping) for m in prompt):
        users = [m for m in prompt if m.get("role") == "user"]
        if len(users) != 1 or any(m.get("role") == "assistant" for m in prompt):
            raise DiceError(f"{where}: only single-turn prompts are supported")
        content = users[0].get("content")
        if not isinstance(content, str):
            raise DiceError(f"{where}: the user message's content must be a string, not "
                            f"{type(content).__name__}")
        return content
    raise DiceError(f"{where}: expected a string or a list of chat messages, not "
                    f"{type(prompt).__name__}")


SCORE_COLUMNS = ("score_chosen", "score_rejected")  # optional, as in UltraFeedback


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_messages(messages: list[Any], where: str) -> None:
    """A chat message list: objects with a string `role` and a string `content`."""
    for j, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise DiceError(f"{where}: message {j} must be an object with string 'role' and "
                            f"'content', got {_type_name(m)}")
        for field in ("role", "content"):
            if not isinstance(m.get(field), str):
                raise DiceError(f"{where}: message {j}: {field!r} must be a string, got "
                                f"{_type_name(m.get(field))}")


def normalise_row(row: dict[str, Any], index: int, source: str = "offline data") -> dict:
    """TRL-format row -> {"prompt", "chosen", "rejected"} strings (other keys kept).

    Each of the three columns is a string or a chat message list; `score_chosen` /
    `score_rejected`, where present, are numbers. Anything else raises a DiceError naming
    the source, the row (0-based) and the column.
    """
    where = f"{source}: row {index}"
    if not isinstance(row, Mapping):
        raise DiceError(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected', "
                        f"got {_type_name(row)}")
    for key in COLUMNS:
        if key not in row:
            raise DiceError(f"{source}: row {index} has no {key!r} column")
        value = row[key]
        if isinstance(value, list):
            _check_messages(value, f"{where}: {key!r}")
        elif not isinstance(value, str):
            raise DiceError(f"{where}: {key!r} must be a string or a list of chat messages, "
                            f"got {_type_name(value)}")
    for key in SCORE_COLUMNS:
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
            raise DiceError(f"{where}: {key!r} must be a number, got {_type_name(value)}")
    out = dict(row)
    out["prompt"] = prompt_text(row["prompt"], f"{source}: row {index}")
    for key in ("chosen", "rejected"):
        value = row[key]
        if not isinstance(value, str):
            replies = [m for m in value if m["role"] == "assistant"]
            if not replies:
                raise DiceError(f"{source}: row {index}: {key!r} has no assistant message")
            out[key] = replies[-1]["content"]
    return out


def _read_local(path: str) -> list[Any]:
    """Rows of a local file: Parquet, a JSON list, or JSON Lines (errors name the line)."""
    if not os.path.isfile(path):
        raise DiceError(f"{path}: file not found")
    if path.endswith(".parquet"):
        from datasets import load_dataset

        return list(load_dataset("parquet", data_files=path, split="train"))
    return read_json_rows(path)


def load_preference_data(source: str, split: str = "train", max_rows: int | None = None,
                         seed: int = 0) -> list[dict[str, Any]]:
    """Loads and normalises D_offline.

    `source`: `builtin:NAME` (shipped with dice-jax), a `.jsonl` / `.json` / `.parquet`
    file, a hub data set id (network needed), `synthetic:N` (N seeded toy pairs for
    smoke tests) or `toy:N` (N seeded pairs of the controlled task, labelled by its gold
    reward: `dice_jax.toy`). `max_rows` takes a seeded random subset
    (the paper's 10k UltraFeedback subset).
    """
    if source.startswith("synthetic:"):
        rows = synthetic_preferences(_count(source), seed)
    elif source.startswith("toy:"):
        from dice_jax.toy.language import preference_rows

        rows = preference_rows(_count(source), seed)
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
    index = list(range(len(rows)))  # errors name the row of the source, not of the subset
    if max_rows is not None and max_rows < len(rows):
        index = np.sort(np.random.default_rng(seed).permutation(len(rows))[:max_rows]).tolist()
        rows = [rows[i] for i in index]
    return [normalise_row(r, i, source) for i, r in zip(index, rows)]


_TOPICS = ("rivers", "bees", "clocks", "bread", "comets", "maps", "violins", "glaciers",
           "lanterns", "owls", "bridges", "tea", "volcanoes", "kites", "coral", "salt")
_STYLES = ("short", "cheerful", "formal", "simple", "vivid", "calm")


def _count(source: str) -> int:
    kind, text = source.split(":", 1)
    if not text.isdigit() or int(text) < 1:
        raise DiceError(f"{source}: expected {kind}:N with N >= 1")
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


# ---------------------------------------------------------------------- evaluation prompts
def _prompt_row(row: Any, index: int, source: str) -> dict[str, Any]:
    """One prompt row of a file or hub data set in the judge's shape."""
    where = f"{source}: row {index}"
    if not isinstance(row, Mapping):
        raise DiceError(f"{where}: expected an object, got {type(row).__name__}")
    text = row.get("prompt", row.get("instruction"))
    if not isinstance(text, str) or not text.strip():
        raise DiceError(f"{where}: needs a non-empty string 'prompt' or 'instruction'")
    ids = row.get("instruction_ids", row.get("instruction_id_list"))
    kwargs = row.get("kwargs")
    out: dict[str, Any] = {"id": str(row.get("id", row.get("key", index))), "prompt": text}
    if ids:
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DiceError(f"{where}: 'instruction_ids' must be a list of strings")
        kwargs = [{} for _ in ids] if kwargs is None else kwargs
        if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(
                isinstance(k, Mapping) or k is None for k in kwargs):
            raise DiceError(f"{where}: 'kwargs' must be a list of {len(ids)} objects, one per "
                            "instruction")
        # Hub rows carry every argument of the column's struct; unused ones are None.
        out["instruction_ids"] = list(ids)
        out["kwargs"] = [{k: v for k, v in (a or {}).items() if v is not None} for a in kwargs]
    if isinstance(row.get("dataset"), str):
        out["dataset"] = row["dataset"]
    return out


def load_eval_prompts(spec: str, num: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Prompt rows `{"id", "prompt"[, "instruction_ids", "kwargs", "dataset"]}`.

    `spec`: `builtin:eval` / `builtin:train` (`num` generated prompts of that split with
    `seed`; `num` required), `toy:eval` / `toy:train` (the controlled task's first `num`
    prompts of that split; `num` required), a `.jsonl` / `.json` file, or a hub data set
    id (its `train` split, e.g. `google/IFEval`). Files and hub sets give their first
    `num` rows (all when `num` is None).
    """
    from dice_jax.judge.prompts import generate_prompts

    if num is not None and num < 1:
        raise DiceError(f"number of eval prompts must be >= 1, not {num}")
    if spec.startswith("toy:"):
        from dice_jax.toy.language import eval_rows

        split = spec.split(":", 1)[1]
        if split not in ("eval", "train"):
            raise DiceError(f"{spec}: unknown toy prompt set; use toy:eval or toy:train")
        if num is None:
            raise DiceError(f"{spec}: the number of prompts is required")
        return eval_rows(split, num)
    if spec.startswith("builtin:"):
        split = spec.split(":", 1)[1]
        if split not in ("eval", "train"):
            raise DiceError(f"{spec}: unknown built-in prompt set; use builtin:eval or "
                            "builtin:train")
        if num is None:
            raise DiceError(f"{spec}: the number of prompts to generate is required")
        return generate_prompts(split, num, seed)
    if os.path.isfile(spec):
        raw = _read_local(spec)
    elif os.path.exists(spec) or spec.endswith((".jsonl", ".json")) or not re.fullmatch(
            r"[\w.-]+/[\w.-]+", spec):
        raise DiceError(f"{spec}: prompt file not found (expected builtin:eval, a JSONL/JSON "
                        "file or a hub data set id such as google/IFEval)")
    else:
        try:
            from datasets import load_dataset

            raw = list(load_dataset(spec, split="train"))
        except Exception as e:  # datasets raises many types; all mean "not available"
            raise DiceError(f"{spec}: cannot load the hub data set (network access to the "
                            f"Hugging Face hub is needed; {type(e).__name__}: "
                            f"{str(e).strip()[:200]})") from None
    rows = [_prompt_row(r, i, spec) for i, r in enumerate(raw[:num] if num else raw)]
    if not rows:
        raise DiceError(f"{spec}: no prompts")
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if row["id"] in seen:
            row["id"] = f"{row['id']}#{i}"
        seen.add(row["id"])
    return rows
