"""The sampling stage on disk: every response with its tokens and policy log-probs.

`save_samples(folder, prompts, result)` writes three files into `folder` (an existing
temporary stage folder, which the run renames into place when the stage completes; each
file is itself written under a temporary name and renamed):

    samples.jsonl       one row per (prompt, sample), in prompt order then sample order:
                        prompt_index, sample_index, prompt (text, chat messages or token
                        ids, as given), response (text), finish_reason ("stop"/"length"),
                        num_tokens (incl. the stop token), sum_logprob (the sampler's
                        log pi(y|x)). Readable by `datasets.load_dataset("json", ...)`.
    samples.npz         the ragged arrays, flat with offsets (P prompts, K samples,
                        N = P * K responses, row n = prompt n // K, sample n % K):
                          shape              int64 [2] = (P, K)
                          token_ids          int32 [total response tokens]
                          logprobs           float32 [total response tokens]
                          token_offsets      int64 [N + 1]; response n is
                                             token_ids[token_offsets[n]:token_offsets[n+1]]
                          prompt_token_ids   int32 [total prompt tokens]
                          prompt_offsets     int64 [P + 1]
    samples_meta.json   format version, P, K, token totals and the caller's `extra`;
                        written last, so a save cut short leaves no meta file.

`load_samples(folder)` reads them back into a `SampleSet`, exactly (ids, float32 log-probs
and texts bit for bit), and raises a DiceError naming the file for anything missing,
truncated or inconsistent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from dice_jax.errors import DiceError
from dice_jax.fileio import atomic_file, read_json, read_jsonl, write_json, write_jsonl
from dice_jax.sampling.results import SamplingResult

SAMPLES_JSONL = "samples.jsonl"
SAMPLES_NPZ = "samples.npz"
SAMPLES_META = "samples_meta.json"
FORMAT_VERSION = 1
_NPZ_KEYS = ("shape", "token_ids", "logprobs", "token_offsets", "prompt_token_ids",
             "prompt_offsets")


@dataclasses.dataclass
class SampleSet:
    """K responses for each of P prompts, as the scorer and the data builder consume them.

    `prompts [P]` as given to the sampler (text, chat messages or token ids);
    `prompt_token_ids [P]` the templated prompt ids the responses continue; `texts`,
    `finish_reasons` `[P][K]`; `token_ids [P][K]` int32 `[length]` (incl. the stop token
    when finish_reason is "stop"); `logprobs [P][K]` float32 `[length]` (the policy's
    untempered token log-probs, as sampled); `extra` the metadata saved with them.
    """

    prompts: list[Any]
    prompt_token_ids: list[list[int]]
    texts: list[list[str]]
    token_ids: list[list[np.ndarray]]
    logprobs: list[list[np.ndarray]]
    finish_reasons: list[list[str]]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    @property
    def num_samples(self) -> int:
        """K, the responses per prompt."""
        return len(self.texts[0]) if self.texts else 0

    def token_counts(self) -> np.ndarray:
        """Response lengths in tokens, int64 `[P, K]` (stop token included)."""
        return np.array([[len(t) for t in row] for row in self.token_ids], np.int64).reshape(
            self.num_prompts, self.num_samples)

    def validate(self) -> None:
        """Raises a DiceError unless every per-prompt list has P rows of K entries and each
        response's ids and log-probs have the same length."""
        p, k = self.num_prompts, self.num_samples
        if len(self.prompt_token_ids) != p:
            raise DiceError(f"sample set: {len(self.prompt_token_ids)} prompt token lists for "
                            f"{p} prompts")
        for name in ("texts", "token_ids", "logprobs", "finish_reasons"):
            rows = getattr(self, name)
            if len(rows) != p or any(len(r) != k for r in rows):
                raise DiceError(f"sample set: {name} is not [P={p}][K={k}]")
        for i in range(p):
            for j in range(k):
                if len(self.token_ids[i][j]) != len(self.logprobs[i][j]):
                    raise DiceError(f"sample set: prompt {i} sample {j} has "
                                    f"{len(self.token_ids[i][j])} tokens but "
                                    f"{len(self.logprobs[i][j])} log-probs")

    @classmethod
    def from_result(cls, prompts: Sequence[Any], result: SamplingResult,
                    extra: dict[str, Any] | None = None) -> SampleSet:
        """The sample set of a `Sampler.sample(prompts)` result."""
        if len(prompts) != len(result.samples):
            raise DiceError(f"{len(prompts)} prompts but the sampling result has "
                            f"{len(result.samples)}")
        out = cls(prompts=[_plain(p) for p in prompts],
                  prompt_token_ids=[[int(t) for t in ids] for ids in result.prompt_token_ids],
                  texts=[[s.text for s in row] for row in result.samples],
                  token_ids=[[np.asarray(s.token_ids, np.int32) for s in row]
                             for row in result.samples],
                  logprobs=[[np.asarray(s.logprobs, np.float32) for s in row]
                            for row in result.samples],
                  finish_reasons=[[s.finish_reason for s in row] for row in result.samples],
                  extra=dict(extra or {}))
        out.validate()
        return out


def _plain(prompt: Any) -> Any:
    """A prompt as JSON-ready Python values (numpy ids -> ints, message tuples -> lists)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, np.ndarray):
        return [int(t) for t in prompt.tolist()]
    items = list(prompt)
    if all(isinstance(t, (int, np.integer)) for t in items):
        return [int(t) for t in items]
    return [dict(m) for m in items]


def _offsets(lengths: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64))]).astype(np.int64)


def _flat(arrays: Sequence[np.ndarray], dtype: Any) -> np.ndarray:
    return (np.concatenate([np.asarray(a, dtype) for a in arrays]) if arrays
            else np.zeros(0, dtype))


def save_samples(folder: str, prompts: Sequence[Any], result: SamplingResult | SampleSet,
                 extra: dict[str, Any] | None = None) -> SampleSet:
    """Writes `samples.jsonl`, `samples.npz` and `samples_meta.json` into `folder`
    (created if needed; see the module doc for the layout) and returns the SampleSet.

    `result` is a `SamplingResult` of `Sampler.sample(prompts)` or a `SampleSet` (then
    `prompts` must be its prompts); `extra` is JSON metadata kept in `samples_meta.json`
    (e.g. the sampling config and timings).
    """
    if isinstance(result, SampleSet):
        if len(prompts) != result.num_prompts:
            raise DiceError(f"{len(prompts)} prompts but the sample set has "
                            f"{result.num_prompts}")
        sample_set = dataclasses.replace(result, prompts=[_plain(p) for p in prompts],
                                         extra=dict(result.extra, **(extra or {})))
        sample_set.validate()
    else:
        sample_set = SampleSet.from_result(prompts, result, extra)
    p, k = sample_set.num_prompts, sample_set.num_samples
    if p == 0 or k == 0:
        raise DiceError(f"nothing to save: {p} prompts x {k} samples")
    try:
        json.dumps(sample_set.extra)
    except (TypeError, ValueError) as e:
        raise DiceError(f"save_samples: extra metadata is not JSON-serialisable ({e})"
                        ) from None
    responses = [a for row in sample_set.token_ids for a in row]
    logprobs = [a for row in sample_set.logprobs for a in row]
    os.makedirs(folder, exist_ok=True)
    arrays = {
        "shape": np.asarray([p, k], np.int64),
        "token_ids": _flat(responses, np.int32),
        "logprobs": _flat(logprobs, np.float32),
        "token_offsets": _offsets([len(a) for a in responses]),
        "prompt_token_ids": _flat([np.asarray(t, np.int32) for t in
                                   sample_set.prompt_token_ids], np.int32),
        "prompt_offsets": _offsets([len(t) for t in sample_set.prompt_token_ids]),
    }
    with atomic_file(os.path.join(folder, SAMPLES_NPZ), "wb") as f:
        np.savez(f, **arrays)
    write_jsonl(os.path.join(folder, SAMPLES_JSONL), (
        {"prompt_index": i, "sample_index": j, "prompt": sample_set.prompts[i],
         "response": sample_set.texts[i][j], "finish_reason": sample_set.finish_reasons[i][j],
         "num_tokens": len(sample_set.token_ids[i][j]),
         "sum_logprob": float(np.sum(sample_set.logprobs[i][j], dtype=np.float64))}
        for i in range(p) for j in range(k)))
    write_json(os.path.join(folder, SAMPLES_META), {
        "format_version": FORMAT_VERSION, "num_prompts": p, "num_samples": k,
        "num_response_tokens": int(arrays["token_ids"].size),
        "num_prompt_tokens": int(arrays["prompt_token_ids"].size),
        "extra": sample_set.extra})
    return sample_set


def _read_meta(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, SAMPLES_META)
    if not os.path.isfile(path):
        raise DiceError(f"{path}: missing; the sampling stage did not finish")
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise DiceError(f"{path}: not a samples file of format version {FORMAT_VERSION}")
    for key in ("num_prompts", "num_samples", "num_response_tokens", "num_prompt_tokens"):
        if not isinstance(meta.get(key), int):
            raise DiceError(f"{path}: field {key!r} is missing or not an integer")
    return meta


def _read_npz(folder: str, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    path = os.path.join(folder, SAMPLES_NPZ)
    if not os.path.isfile(path):
        raise DiceError(f"{path}: missing; the sampling stage did not finish")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [key for key in _NPZ_KEYS if key not in f.files]
            if missing:
                raise DiceError(f"{path}: arrays {missing} are missing")
            arrays = {key: f[key] for key in _NPZ_KEYS}
    except DiceError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise DiceError(f"{path}: corrupt or truncated ({type(e).__name__}: {e})") from None
    p, k = meta["num_prompts"], meta["num_samples"]
    expect = {"shape": ((2,), np.int64), "token_offsets": ((p * k + 1,), np.int64),
              "prompt_offsets": ((p + 1,), np.int64),
              "token_ids": ((meta["num_response_tokens"],), np.int32),
              "logprobs": ((meta["num_response_tokens"],), np.float32),
              "prompt_token_ids": ((meta["num_prompt_tokens"],), np.int32)}
    for key, (shape, dtype) in expect.items():
        a = arrays[key]
        if a.shape != shape or a.dtype != dtype:
            raise DiceError(f"{path}: array {key!r} is {a.dtype}{list(a.shape)}, expected "
                            f"{np.dtype(dtype)}{list(shape)}")
    if arrays["shape"].tolist() != [p, k]:
        raise DiceError(f"{path}: shape {arrays['shape'].tolist()} does not match "
                        f"{SAMPLES_META} ({p} prompts x {k} samples)")
    for key, data in (("token_offsets", "token_ids"), ("prompt_offsets", "prompt_token_ids")):
        off = arrays[key]
        if off[0] != 0 or off[-1] != arrays[data].size or np.any(np.diff(off) < 0):
            raise DiceError(f"{path}: {key} are not increasing offsets into {data}")
    return arrays


def _read_rows(folder: str, p: int, k: int) -> list[dict[str, Any]]:
    path = os.path.join(folder, SAMPLES_JSONL)
    if not os.path.isfile(path):
        raise DiceError(f"{path}: missing; the sampling stage did not finish")
    rows = read_jsonl(path)
    if len(rows) != p * k:
        raise DiceError(f"{path}: {len(rows)} rows, expected {p} prompts x {k} samples = "
                        f"{p * k} (truncated?)")
    for n, row in enumerate(rows):
        where = f"{path}: line {n + 1}"
        if not isinstance(row, dict):
            raise DiceError(f"{where}: not a JSON object")
        for key in ("prompt_index", "sample_index", "prompt", "response", "finish_reason",
                    "num_tokens"):
            if key not in row:
                raise DiceError(f"{where}: field {key!r} is missing")
        if (row["prompt_index"], row["sample_index"]) != divmod(n, k):
            raise DiceError(f"{where}: (prompt_index, sample_index) = "
                            f"({row['prompt_index']}, {row['sample_index']}), expected "
                            f"{divmod(n, k)}")
        if row["finish_reason"] not in ("stop", "length"):
            raise DiceError(f"{where}: finish_reason {row['finish_reason']!r} is not 'stop' "
                            "or 'length'")
    return rows


def load_samples(folder: str) -> SampleSet:
    """Reads a folder written by `save_samples` back into a SampleSet (exactly).

    Raises a DiceError naming the file when a file is missing, truncated or corrupt, or when
    the files disagree with each other (row counts, token counts).
    """
    if not os.path.isdir(folder):
        raise DiceError(f"{folder}: no such samples folder")
    meta = _read_meta(folder)
    p, k = meta["num_prompts"], meta["num_samples"]
    arrays = _read_npz(folder, meta)
    rows = _read_rows(folder, p, k)
    off, poff = arrays["token_offsets"], arrays["prompt_offsets"]
    token_ids: list[list[np.ndarray]] = [[] for _ in range(p)]
    logprobs: list[list[np.ndarray]] = [[] for _ in range(p)]
    for n, row in enumerate(rows):
        lo, hi = int(off[n]), int(off[n + 1])
        if row["num_tokens"] != hi - lo:
            raise DiceError(f"{os.path.join(folder, SAMPLES_JSONL)}: line {n + 1} has "
                            f"num_tokens={row['num_tokens']} but {SAMPLES_NPZ} holds "
                            f"{hi - lo} tokens for it")
        token_ids[n // k].append(arrays["token_ids"][lo:hi].copy())
        logprobs[n // k].append(arrays["logprobs"][lo:hi].copy())
    return SampleSet(
        prompts=[rows[i * k]["prompt"] for i in range(p)],
        prompt_token_ids=[arrays["prompt_token_ids"][poff[i]:poff[i + 1]].tolist()
                          for i in range(p)],
        texts=[[rows[i * k + j]["response"] for j in range(k)] for i in range(p)],
        token_ids=token_ids, logprobs=logprobs,
        finish_reasons=[[rows[i * k + j]["finish_reason"] for j in range(k)] for i in range(p)],
        extra=meta.get("extra") or {})
