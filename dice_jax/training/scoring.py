"""Batched, sharded sequence log-probs of (prompt, response) token sequences.

`sequence_scores(params, config, prompt_ids, response_ids, prompt_index)` returns each
response's summed token log-probs float32 `[N]` and its token count `[N]` under a model:
the sums run over the response tokens only (the stop token included), exactly the masking
of training (`dice_jax.training.logprobs`). DICE scores its samples with it
(`dice_jax.dice.scoring`); nothing here knows about DICE.

The forward has two layouts, equal up to float rounding (tested):

- shared prompts (default): the responses of a prompt share it, so each prompt runs once.
  Prompts are prefilled in groups (`[G, P]`, left-padded, `Decoder.extend` into a KV
  cache); then the group's responses, sorted by length, run in batches of `batch_size`
  rows (`[rows, R]`, right-padded), each row attending to its prompt's cache. Logits are
  computed only at the positions that score a response token. With `pack_tokens`
  (default) the prompts' and responses' real tokens are packed (`models.packing`): every
  per-token matmul (projections, MLP, vocabulary projection) skips the padding, and only
  attention runs on the padded rows.
- whole sequences (`share_prompts=False`): every row is prompt + response, `[rows, T]`
  right-padded, through one jitted `sequence_logprobs` (the training function).

Either way rows are sorted by length and padded to bucketed lengths (by default four per
octave: multiples of 32 up to 256, of 64 up to 512, ...; or powers of two, or multiples
of a fixed step), so few programs compile and little padding is computed; the
vocabulary projection and float32 log-softmax run in chunks (`token_logprobs`), chunks
without a response token skipped. Batches are placed like training batches (rows over
the mesh's `data`/`fsdp` axes, params per `param_shardings`; a group's prompt cache is
replicated so any row can read it). A progress bar reports samples/s and tokens/s.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from dice_jax.distributed import host_tree
from dice_jax.errors import DiceError
from dice_jax.models.config import ModelConfig
from dice_jax.models.packing import Packing, packed_capacity, packing_from_mask
from dice_jax.sharding import (
    DEFAULT_RULES,
    MeshFunction,
    Rules,
    batch_sharding,
    make_mesh,
    param_shardings,
    put_process_local,
    replicated,
)
from dice_jax.training.logprobs import (
    DEFAULT_CHUNK,
    prefill_prompts,
    response_logprobs,
    sequence_logprobs,
)

Buckets = int | str  # "auto", "pow2", or a multiple of tokens (e.g. 64)


def bucket_length(n: int, buckets: Buckets = "auto") -> int:
    """The padded length of a row of `n` tokens.

    `"auto"`: the next multiple of `max(32, next_power_of_two(n) / 8)`, i.e. multiples of
    32 up to 256, of 64 up to 512, of 128 up to 1024, ...: four lengths per octave, so the
    padding stays under a quarter of the row (about an eighth on average) while the
    number of compiled programs grows only with log(length). An int: the next multiple of
    it. `"pow2"`: the next power of two (at least 16).
    """
    n = max(1, int(n))
    if buckets == "auto":
        step = max(32, (1 << (n - 1).bit_length()) // 8)
        return -(-n // step) * step
    if buckets == "pow2":
        return max(16, 1 << (n - 1).bit_length())
    if not isinstance(buckets, int) or isinstance(buckets, bool) or buckets < 1:
        raise DiceError(f"scoring buckets={buckets!r}: expected a positive int, 'auto' or "
                        "'pow2'")
    return -(-n // buckets) * buckets


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """How many ways the mesh splits the batch axis (the product of its `batch` axes)."""
    target = dict(rules).get("batch")
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return math.prod(mesh.shape.get(a, 1) for a in axes)


def plan_batches(lengths: Sequence[int], batch_size: int, buckets: Buckets = "auto"
                 ) -> list[tuple[int, list[int]]]:
    """`(padded length, row indices)` per batch: rows sorted longest first (so a batch
    that does not fit in memory fails at once), `batch_size` rows a batch (the last one
    may hold fewer), each padded to the bucket of its longest row."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [(bucket_length(lengths[chunk[0]], buckets), chunk)
            for chunk in (order[s:s + batch_size] for s in range(0, len(order), batch_size))]


def plan_prompt_groups(prompt_lengths: Sequence[int], index: Sequence[int], rows: int,
                       multiple: int = 1, buckets: Buckets = "auto",
                       prompt_group: int | None = None
                       ) -> list[tuple[int, int, list[int], list[int]]]:
    """Prompt groups for shared-prompt scoring, as `(group size, padded prompt length,
    prompt indices, response rows)`: the prompts that responses use, longest first,
    `prompt_group` at a time (default: about 8 batches of `rows` responses), the size
    rounded up to a `multiple` (the data-parallel size) so every group has one shape."""
    used = sorted(set(index), key=lambda i: (-prompt_lengths[i], i))
    group = prompt_group or max(1, round(8 * rows * len(used) / max(1, len(index))))
    group = -(-min(group, len(used)) // multiple) * multiple
    rows_of: dict[int, list[int]] = {}
    for n, i in enumerate(index):
        rows_of.setdefault(i, []).append(n)
    out = []
    for start in range(0, len(used), group):
        members = used[start:start + group]
        out.append((group, bucket_length(prompt_lengths[members[0]], buckets), members,
                    [n for i in members for n in rows_of[i]]))
    return out


def build_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                indices: Sequence[int], rows: int, length: int, pad_id: int = 0
                ) -> dict[str, np.ndarray]:
    """Right-padded `input_ids`, `attention_mask`, `loss_mask` int32 `[rows, length]`:
    row r is prompt + response of `indices[r]`, the loss mask 1 over its response tokens;
    rows past `len(indices)` are all padding (masks 0)."""
    ids = np.full((rows, length), pad_id, np.int32)
    attention = np.zeros((rows, length), np.int32)
    loss = np.zeros((rows, length), np.int32)
    for r, i in enumerate(indices):
        p, y = len(prompt_ids[i]), len(response_ids[i])
        ids[r, :p] = prompt_ids[i]
        ids[r, p:p + y] = response_ids[i]
        attention[r, :p + y] = 1
        loss[r, p:p + y] = 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


@functools.lru_cache(maxsize=8)
def scoring_function(config: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                     chunk_size: int = DEFAULT_CHUNK) -> MeshFunction:
    """`fn(params, input_ids, attention_mask, loss_mask) -> (logps [rows] float32,
    counts [rows] int32)` over whole right-padded sequences `[rows, length]`, jitted on
    `mesh` (one compilation per batch shape), results replicated. Memoised so the policy
    and reference forwards share compilations."""
    def fn(params: Any, input_ids: jax.Array, attention_mask: jax.Array,
           loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        return sequence_logprobs(params, config, input_ids, attention_mask, loss_mask,
                                 chunk_size)
    return MeshFunction(fn, mesh, tuple(rules), out_shardings=replicated(mesh))


@functools.lru_cache(maxsize=8)
def shared_prompt_functions(config: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                            chunk_size: int = DEFAULT_CHUNK
                            ) -> tuple[MeshFunction, MeshFunction]:
    """`(prefill, responses)`, jitted on `mesh`, for scoring K responses per prompt with
    each prompt run once.

    `prefill(params, prompt_ids [G, P], prompt_mask [G, P], packing=None)` (prompts
    LEFT-padded) ->
    `(cache, last)`: the prompts' KV cache `{"k", "v"} [layers, G, P, kv_heads,
    head_dim]` and the normed hidden state after each prompt's last token `[G, embed]`
    (it scores the first response token), both replicated so that any batch of responses
    can read any prompt of the group.

    `responses(params, cache, last, prompt_mask [G, P], row_prompt [rows] int32,
    response_ids [rows, R], response_mask [rows, R], packing=None)` (responses
    RIGHT-padded) ->
    `(logps [rows] float32, counts [rows] int32)`: each row's response runs against its
    prompt's cache (`training.logprobs.response_logprobs`: `Decoder.extend` at slots
    P..P+R-1); response token j is scored by
    the hidden state before it (`last` for j = 0), the vocabulary projection and float32
    log-softmax chunked as in training (`token_logprobs`).

    `packing` (a `models.packing.Packing` of the batch's mask, or None): the weight
    matmuls and the vocabulary projection run on the real tokens only.
    """
    def prefill(params: Any, prompt_ids: jax.Array, prompt_mask: jax.Array,
                packing: Packing | None = None) -> tuple[dict, jax.Array]:
        return prefill_prompts(params, config, prompt_ids, prompt_mask, packing)

    def responses(params: Any, cache: dict, last: jax.Array, prompt_mask: jax.Array,
                  row_prompt: jax.Array, response_ids: jax.Array, response_mask: jax.Array,
                  packing: Packing | None = None) -> tuple[jax.Array, jax.Array]:
        rows_cache = {name: jnp.take(a, row_prompt, axis=1) for name, a in cache.items()}
        return response_logprobs(params, config, rows_cache, last[row_prompt],
                                 prompt_mask[row_prompt], response_ids, response_mask,
                                 chunk_size, packing)

    out = replicated(mesh)
    return (MeshFunction(prefill, mesh, tuple(rules), out_shardings=(out, out)),
            MeshFunction(responses, mesh, tuple(rules), out_shardings=(out, out)))


class _Progress:
    """The scoring progress bar: samples done, tokens/s (prompt + response tokens)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = tqdm(total=total, unit="sample", desc=desc, disable=not enabled,
                        dynamic_ncols=True)
        self.start, self.tokens = time.perf_counter(), 0

    def update(self, samples: int, tokens: int, **info: Any) -> None:
        self.tokens += tokens
        self.bar.update(samples)
        self.bar.set_postfix(tok_s=f"{self.tokens / (time.perf_counter() - self.start):.0f}",
                             **info)


def sequence_scores(params: Any, config: ModelConfig, prompt_ids: Sequence[Sequence[int]],
                    response_ids: Sequence[Sequence[int]],
                    prompt_index: Sequence[int] | None = None, *, mesh: Mesh | None = None,
                    batch_size: int = 16, buckets: Buckets = "auto", share_prompts: bool = True,
                    prompt_group: int | None = None, pack_tokens: bool = True,
                    chunk_size: int = DEFAULT_CHUNK, rules: Rules = DEFAULT_RULES,
                    progress: bool = True, desc: str = "scoring"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs float32 `[N]` and response token counts int64 `[N]` of N
    responses under the model `params`; response n continues prompt `prompt_index[n]`
    (default: prompt n).

    `batch_size` responses run per forward, rounded up to a multiple of the mesh's
    data-parallel size; `mesh=None` runs on one device; `params` are placed per
    `param_shardings`. With `share_prompts` each prompt runs once, in groups of
    `prompt_group` prompts (default: about 8 batches of responses), and its responses
    attend to its KV cache; otherwise every row is a whole prompt + response sequence.
    With `share_prompts` and `pack_tokens`, the weight matmuls and the vocabulary
    projection run on the real tokens only (`models.packing`), attention on the padded
    rows.
    """
    index = list(range(len(prompt_ids))) if prompt_index is None else [int(i) for i in
                                                                        prompt_index]
    if len(index) != len(response_ids):
        raise DiceError(f"{len(index)} prompt indices but {len(response_ids)} responses")
    if batch_size < 1:
        raise DiceError(f"scoring batch_size={batch_size} must be >= 1")
    for n, i in enumerate(index):
        if not 0 <= i < len(prompt_ids):
            raise DiceError(f"row {n}: prompt index {i} is outside [0, {len(prompt_ids)})")
        if len(prompt_ids[i]) == 0:
            raise DiceError(f"row {n}: empty prompt; the first response token needs a "
                            "prompt token before it to be scored")
    mesh = mesh or make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    dp = data_parallel_size(mesh, rules)
    rows = -(-batch_size // dp) * dp
    params = jax.device_put(params, param_shardings(config, mesh, rules))
    logps = np.zeros(len(index), np.float32)
    counts = np.zeros(len(index), np.int64)
    bar = _Progress(len(index), desc, progress)
    run = _score_shared if share_prompts else _score_whole
    with bar.bar:
        run(params, config, prompt_ids, response_ids, index, logps, counts, bar, mesh=mesh,
            rows=rows, buckets=buckets, chunk_size=chunk_size, rules=tuple(rules),
            prompt_group=prompt_group, pack_tokens=pack_tokens)
    expected = np.asarray([len(r) for r in response_ids], np.int64)
    if not np.array_equal(counts, expected):
        bad = int(np.flatnonzero(counts != expected)[0])
        raise DiceError(f"row {bad}: scored {counts[bad]} response tokens, expected "
                        f"{expected[bad]}")
    return logps, counts


def _put(mesh: Mesh, rules: Rules, array: np.ndarray) -> jax.Array:
    """A host batch (axis 0 = rows) placed like a training batch."""
    return put_process_local(array, batch_sharding(mesh, array.shape, 0, rules), 0)


def _score_whole(params: Any, config: ModelConfig, prompt_ids: Sequence[Sequence[int]],
                 response_ids: Sequence[Sequence[int]], index: list[int], logps: np.ndarray,
                 counts: np.ndarray, bar: _Progress, *, mesh: Mesh, rows: int,
                 buckets: Buckets, chunk_size: int, rules: Rules, prompt_group: int | None,
                 pack_tokens: bool) -> None:
    """Every row a whole right-padded prompt + response through `sequence_logprobs`."""
    fn = scoring_function(config, mesh, rules, chunk_size)
    prompts = [prompt_ids[i] for i in index]
    lengths = [len(p) + len(r) for p, r in zip(prompts, response_ids)]
    for length, members in plan_batches(lengths, rows, buckets):
        batch = build_batch(prompts, response_ids, members, rows, length, config.pad_token_id or 0)
        sums, n = host_tree(fn(params, *(_put(mesh, rules, batch[k]) for k in
                                               ("input_ids", "attention_mask", "loss_mask"))))
        logps[members] = np.asarray(sums)[:len(members)]
        counts[members] = np.asarray(n)[:len(members)]
        bar.update(len(members), sum(lengths[i] for i in members), length=length)


def _score_shared(params: Any, config: ModelConfig, prompt_ids: Sequence[Sequence[int]],
                  response_ids: Sequence[Sequence[int]], index: list[int], logps: np.ndarray,
                  counts: np.ndarray, bar: _Progress, *, mesh: Mesh, rows: int,
                  buckets: Buckets, chunk_size: int, rules: Rules, prompt_group: int | None,
                  pack_tokens: bool) -> None:
    """Prompts prefilled once per group; each response row against its prompt's cache."""
    prefill, responses = shared_prompt_functions(config, mesh, rules, chunk_size)
    pad_id = config.pad_token_id or 0
    dp = data_parallel_size(mesh, rules)

    def packing(mask: np.ndarray) -> Packing | None:  # placed like the batch, or None
        if not pack_tokens:
            return None
        packed = packing_from_mask(mask, packed_capacity(np.count_nonzero(mask), dp), dp)
        return Packing(*(_put(mesh, rules, a) for a in packed))

    groups = plan_prompt_groups([len(p) for p in prompt_ids], index, rows, dp, buckets,
                                prompt_group)
    for group, width, members, group_rows in groups:
        ids = np.full((group, width), pad_id, np.int32)
        mask = np.zeros((group, width), np.int32)
        for g, i in enumerate(members):  # left-padded: the response follows at slot width
            ids[g, width - len(prompt_ids[i]):] = prompt_ids[i]
            mask[g, width - len(prompt_ids[i]):] = 1
        mask_d = _put(mesh, rules, mask)
        cache, last = prefill(params, _put(mesh, rules, ids), mask_d, packing(mask))
        local = {i: g for g, i in enumerate(members)}
        lengths = [len(response_ids[n]) for n in group_rows]
        for length, picked in plan_batches(lengths, rows, buckets):
            chosen = [group_rows[j] for j in picked]
            row_prompt = np.zeros(rows, np.int32)
            row_prompt[:len(chosen)] = [local[index[n]] for n in chosen]
            resp = np.full((rows, length), pad_id, np.int32)
            resp_mask = np.zeros((rows, length), np.int32)
            for r, n in enumerate(chosen):
                resp[r, :len(response_ids[n])] = response_ids[n]
                resp_mask[r, :len(response_ids[n])] = 1
            sums, got = host_tree(responses(
                params, cache, last, mask_d, *(_put(mesh, rules, a) for a in
                                               (row_prompt, resp, resp_mask)),
                packing(resp_mask)))
            logps[chosen] = np.asarray(sums)[:len(chosen)]
            counts[chosen] = np.asarray(got)[:len(chosen)]
            bar.update(len(chosen), sum(len(prompt_ids[index[n]]) + len(response_ids[n])
                                        for n in chosen), length=width + length)
