"""Preference pairs -> padded token arrays: chat template, truncation, drop-and-count.

Rows carry `prompt`, `chosen`, `rejected`, as TRL uses: each a string or a list of chat
messages (`{"role", "content"}`). A string prompt becomes one user message; a message-list
response contributes its LAST message (an assistant turn), so full conversations in the
`chosen`/`rejected` columns (UltraFeedback-binarized style) work too.

Tokens: prompt = `apply_chat_template(messages, add_generation_prompt=True)` encoded without
extra special tokens (the template writes its own BOS, if any); response =
`tokenizer(response, add_special_tokens=False)` + ONE end-of-turn id. The end-of-turn id is
`eos_token_id` when given, else the tokenizer's `eos_token_id` (the token its chat template
closes a turn with: `<|im_end|>` for ChatML, `</s>` for Zephyr), else the model config's
`eos_token_ids[0]`. For Llama-3-Instruct pass `eos_token_id=128009` (`<|eot_id|>`) if the
tokenizer's eos is `<|end_of_text|>`.

Truncation follows TRL's DPO (the reference implementation): when prompt + longer response
exceeds `max_length`, the prompt is cut to `max_prompt_length` (keep_end: its last tokens;
keep_start: its first); if still too long, responses are cut to `max_length -
max_prompt_length` from the right.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from dice_jax.errors import DiceError
from dice_jax.fileio import read_json_rows

COLUMNS = ("prompt", "chosen", "rejected")


@dataclasses.dataclass
class PairArrays:
    """A tokenised preference data set: int32 `[pairs, 2, length]` arrays (index 0 =
    chosen, 1 = rejected), right-padded. `loss_mask` marks response tokens."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[-1])

    def take(self, index: Any) -> PairArrays:
        return PairArrays(self.input_ids[index], self.attention_mask[index],
                          self.loss_mask[index])

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "loss_mask": self.loss_mask}

    def prompt_lengths(self) -> np.ndarray:
        """Tokens before each pair's response, int `[pairs]`; raises DiceError when the
        chosen and rejected rows of a pair do not start with the same prompt tokens."""
        scored = self.loss_mask.astype(bool)
        real = self.attention_mask.sum(-1)
        first = np.where(scored.any(-1), scored.argmax(-1), real)  # [pairs, 2]
        in_prompt = np.arange(self.length)[None] < first[:, :1]
        differ = np.any((self.input_ids[:, 0] != self.input_ids[:, 1]) & in_prompt, axis=-1)
        bad = np.flatnonzero((first[:, 0] != first[:, 1]) | differ)
        if bad.size:
            raise DiceError(f"pair {bad[0]}: chosen and rejected do not share their prompt "
                            "tokens (train with shared_prompt=False)")
        return first[:, 0].astype(np.int32)

    def split_lengths(self, multiple: int = 16) -> tuple[int, int]:
        """`(prompt_length, response_length)` of the shared-prompt layout
        (`shared_prompt_dict`) that holds every pair: the longest prompt and the longest
        response, each rounded up to `multiple` (at least 1)."""
        prompts = self.prompt_lengths()
        responses = self.attention_mask.sum(-1).max(-1) - prompts
        up = lambda n: max(1, -(-int(n) // multiple) * multiple)  # noqa: E731
        return up(prompts.max(initial=0)), up(responses.max(initial=0))

    def shared_prompt_dict(self, prompt_length: int, response_length: int
                           ) -> dict[str, np.ndarray]:
        """The pairs with each prompt stored once: `prompt_ids`/`prompt_mask` int32
        `[pairs, prompt_length]` LEFT-padded, `response_ids`/`response_mask` int32
        `[pairs, 2, response_length]` right-padded (see `training.logprobs`)."""
        prompts = self.prompt_lengths()
        out = {"prompt_ids": np.zeros((len(self), prompt_length), np.int32),
               "prompt_mask": np.zeros((len(self), prompt_length), np.int32),
               "response_ids": np.zeros((len(self), 2, response_length), np.int32),
               "response_mask": np.zeros((len(self), 2, response_length), np.int32)}
        for i, n in enumerate(prompts):
            if n > prompt_length:
                raise DiceError(f"pair {i}: prompt of {n} tokens, longer than the "
                                f"prompt_length {prompt_length}")
            out["prompt_ids"][i, prompt_length - n:] = self.input_ids[i, 0, :n]
            out["prompt_mask"][i, prompt_length - n:] = 1
            for j in range(2):
                r = int(self.attention_mask[i, j].sum()) - n
                if r > response_length:
                    raise DiceError(f"pair {i}: response of {r} tokens, longer than the "
                                    f"response_length {response_length}")
                out["response_ids"][i, j, :r] = self.input_ids[i, j, n:n + r]
                out["response_mask"][i, j, :r] = 1
        return out

    def fingerprint(self) -> str:
        """sha256 of the arrays (shape, dtype and bytes): changes whenever the data does."""
        h = hashlib.sha256()
        for name, a in sorted(self.as_dict().items()):
            a = np.ascontiguousarray(a)
            h.update(f"{name}{a.shape}{a.dtype}".encode())
            h.update(a.tobytes())
        return h.hexdigest()


@dataclasses.dataclass
class DataStats:
    rows: int = 0
    kept: int = 0
    dropped_empty: int = 0
    dropped_identical: int = 0
    truncated_prompt: int = 0
    truncated_response: int = 0

    def summary(self) -> str:
        return (f"{self.kept}/{self.rows} pairs kept; dropped {self.dropped_empty} with an "
                f"empty response and {self.dropped_identical} with chosen == rejected; "
                f"truncated {self.truncated_prompt} prompts and {self.truncated_response} "
                "pairs' responses")


def _messages(value: Any, column: str, row: int) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, Sequence) and value and all(
            isinstance(m, Mapping) and "content" in m for m in value):
        return [dict(m) for m in value]
    raise DiceError(f"row {row}: column {column!r} must be a string or a non-empty list of "
                    f"chat messages with 'role' and 'content', got {type(value).__name__}")


def _response_text(value: Any, column: str, row: int) -> str:
    if isinstance(value, str):
        return value
    messages = _messages(value, column, row)
    return str(messages[-1]["content"])


def check_columns(row: Mapping[str, Any], index: int) -> None:
    for column in COLUMNS:
        if column not in row:
            raise DiceError(f"row {index}: missing column {column!r} (preference rows need "
                            f"{', '.join(COLUMNS)}; found {sorted(row)})")


def end_of_turn_id(tokenizer: Any, eos_token_id: int | None = None,
                   config_eos: Sequence[int] = ()) -> int:
    """The id appended after every response (see the module doc for the rule)."""
    if eos_token_id is not None:
        return int(eos_token_id)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        return int(tokenizer.eos_token_id)
    if config_eos:
        return int(config_eos[0])
    raise DiceError("no end-of-turn token: the tokenizer has no eos_token_id and the model "
                    "config no eos_token_ids; pass eos_token_id")


def encode_rows(rows: Iterable[Mapping[str, Any]], tokenizer: Any,
                eos_token_id: int) -> tuple[list[tuple[list[int], list[int], list[int]]],
                                            DataStats]:
    """`(prompt_ids, chosen_ids, rejected_ids)` per usable row, and drop counts."""
    stats = DataStats()
    triples = []
    for i, row in enumerate(rows):
        stats.rows += 1
        check_columns(row, i)
        chosen = _response_text(row["chosen"], "chosen", i)
        rejected = _response_text(row["rejected"], "rejected", i)
        if not chosen.strip() or not rejected.strip():
            stats.dropped_empty += 1
            continue
        if chosen == rejected:
            stats.dropped_identical += 1
            continue
        text = tokenizer.apply_chat_template(_messages(row["prompt"], "prompt", i),
                                             tokenize=False, add_generation_prompt=True)
        prompt_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        chosen_ids = list(tokenizer(chosen, add_special_tokens=False)["input_ids"])
        rejected_ids = list(tokenizer(rejected, add_special_tokens=False)["input_ids"])
        triples.append((prompt_ids, [*chosen_ids, eos_token_id],
                        [*rejected_ids, eos_token_id]))
    return triples, stats


def build_pairs(triples: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]], *,
                max_length: int, max_prompt_length: int, truncation_mode: str = "keep_end",
                pad_token_id: int = 0, pad_to_multiple: int = 64,
                stats: DataStats | None = None) -> tuple[PairArrays, DataStats]:
    """Token triples -> PairArrays, truncating as TRL does and padding every sequence to the
    longest one rounded up to `pad_to_multiple` (at most `max_length`). Pairs whose token
    responses are identical or empty are dropped and counted."""
    stats = stats if stats is not None else DataStats(rows=len(triples))
    rows = []
    for prompt, chosen, rejected in triples:
        prompt, chosen, rejected = list(prompt), list(chosen), list(rejected)
        if not chosen or not rejected:
            stats.dropped_empty += 1
            continue
        if chosen == rejected:
            stats.dropped_identical += 1
            continue
        longer = max(len(chosen), len(rejected))
        if len(prompt) + longer > max_length and len(prompt) > max_prompt_length:
            prompt = (prompt[-max_prompt_length:] if truncation_mode == "keep_end"
                      else prompt[:max_prompt_length])
            stats.truncated_prompt += 1
        if len(prompt) + longer > max_length:
            keep = max_length - len(prompt)
            chosen, rejected = chosen[:keep], rejected[:keep]
            stats.truncated_response += 1
        rows.append((prompt, chosen, rejected))
    stats.kept = len(rows)
    longest = max((len(p) + max(len(c), len(r)) for p, c, r in rows), default=1)
    length = min(max_length, -(-longest // pad_to_multiple) * pad_to_multiple)
    ids = np.full((len(rows), 2, length), pad_token_id, np.int32)
    attn = np.zeros((len(rows), 2, length), np.int32)
    loss = np.zeros((len(rows), 2, length), np.int32)
    for i, (prompt, chosen, rejected) in enumerate(rows):
        for j, response in enumerate((chosen, rejected)):
            seq = prompt + response
            ids[i, j, :len(seq)] = seq
            attn[i, j, :len(seq)] = 1
            loss[i, j, len(prompt):len(seq)] = 1
    return PairArrays(ids, attn, loss), stats


def tokenize_pairs(rows: Iterable[Mapping[str, Any]], tokenizer: Any, *, max_length: int,
                   max_prompt_length: int, truncation_mode: str = "keep_end",
                   eos_token_id: int | None = None, config_eos: Sequence[int] = (),
                   pad_to_multiple: int = 64) -> tuple[PairArrays, DataStats]:
    """Rows of prompt/chosen/rejected -> PairArrays and drop/truncation counts."""
    eos = end_of_turn_id(tokenizer, eos_token_id, config_eos)
    triples, stats = encode_rows(rows, tokenizer, eos)
    pad = getattr(tokenizer, "pad_token_id", None)
    return build_pairs(triples, max_length=max_length, max_prompt_length=max_prompt_length,
                       truncation_mode=truncation_mode, pad_token_id=eos if pad is None else pad,
                       pad_to_multiple=pad_to_multiple, stats=stats)


def read_rows(path: str) -> list[dict[str, Any]]:
    """Rows from a JSON Lines (one object a line) or JSON (a list of objects) file."""
    rows = read_json_rows(path)
    if not all(isinstance(r, dict) for r in rows):
        raise DiceError(f"{path}: expected a list of JSON objects")
    return rows


def split_pairs(data: PairArrays, eval_size: int, seed: int = 0) -> tuple[PairArrays,
                                                                         PairArrays]:
    """A seeded random held-out split: `(train, eval)` with `eval_size` eval pairs."""
    if not 0 <= eval_size < len(data):
        raise DiceError(f"eval_size={eval_size} must be below the {len(data)} pairs")
    order = np.random.default_rng(seed).permutation(len(data))
    return data.take(np.sort(order[eval_size:])), data.take(np.sort(order[:eval_size]))


class PairSampler:
    """Which pairs make up each step's global batch: a seeded permutation per epoch, a
    fixed number of full batches per epoch (the remainder is left out and reshuffled).
    The order is a pure function of `(seed, step)`, so a restarted run resumes it."""

    def __init__(self, num_pairs: int, batch_size: int, seed: int) -> None:
        if num_pairs < batch_size:
            raise DiceError(f"{num_pairs} training pairs are fewer than one batch of "
                            f"{batch_size}")
        self.num_pairs, self.batch_size, self.seed = num_pairs, batch_size, seed
        self.steps_per_epoch = num_pairs // batch_size

    def position(self, step: int) -> tuple[int, int]:
        """`(epoch, batch index within the epoch)` of optimizer step `step` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def indices(self, step: int) -> np.ndarray:
        epoch, pos = self.position(step)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs)
        return order[pos * self.batch_size:(pos + 1) * self.batch_size]
