"""Continuous batching: a fixed set of decode slots kept busy while requests are left.

`SlotEngine.run` turns prompts x K samples into a queue of (prompt, sample) requests. It
fills every free slot from the queue (prefilling each new prompt once into a staging row,
at most `SlotPlan.prefill_limits` prompts a call so that the call's activations fit the
budget's prefill share, then copying it into the slots of its samples), runs the jitted
`slots.decode_chunk` until enough slots are free again, retires the finished rows and
refills. When the queue is empty the active slots move into a narrower set (half as wide;
once per 256 new tokens a row may take, at most four times), so the tail of long rows does
not pay for idle slots. Before each chunk the slots may be reordered longest first, so that
each attention group holds slots of similar length and skips the cache chunks none of them
has reached. All decisions are made on the host from the gathered chunk outputs, in a fixed
order, so every process makes the same ones.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dice_jax.distributed import host_tree, put_global
from dice_jax.models.decoder import cache_bytes
from dice_jax.models.slot_decode import (
    MAX_GROUPS,
    MIN_GROUP,
    attention_block,
    slot_capacity,
    slot_groups,
)
from dice_jax.sampling import slots as programs
from dice_jax.sampling.generate import prefill_fit
from dice_jax.sampling.slots import SlotProgram

CHUNK_STEPS = 64  # decode steps per device call at most (the host checks in between)
MAX_STAGED_PROMPTS = 16  # new prompts prefilled per refill at most
NARROWING = 2  # each narrower slot set is this many times smaller
MAX_NARROWINGS = 4  # each narrower set is one more compiled decode program
# One narrowing per this many new tokens a row may take: a shorter tail does not repay the
# compile.
NEW_TOKENS_PER_NARROWING = 256
REORDER_GAIN = 0.1  # reorder the slots when that reads this fraction fewer keys a step


def next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def round_slots(slots: int, shards: int) -> int:
    """`slots` (a multiple of `shards`) rounded down to whole attention groups per shard
    (`slot_decode.slot_groups`), giving up at most an eighth of them."""
    per_shard, groups = slots // shards, MAX_GROUPS
    while groups > 1 and not (per_shard // groups >= MIN_GROUP
                              and 8 * (per_shard % groups) <= per_shard):
        groups //= 2
    return per_shard // groups * groups * shards


def grouped_order(lengths: list[int], shards: int, groups: int) -> list[int]:
    """Slot order putting slots of similar length in one attention group: the longest
    first, dealt round-robin over the shards. Returns `order` (new slot i = old slot
    order[i])."""
    width = len(lengths)
    per_shard = width // shards
    ranked = sorted(range(width), key=lambda s: -lengths[s])
    order = [0] * width
    for rank, slot in enumerate(ranked):
        order[(rank % shards) * per_shard + rank // shards] = slot
    return order


def attention_cost(lengths: list[int], shards: int, groups: int, block: int) -> int:
    """Cache keys a decode step reads (`slot_attention`): per group, its slots x the chunks
    its longest slot needs."""
    per_shard = len(lengths) // shards
    size = per_shard // groups
    cost = 0
    for j in range(groups):
        longest = max(max(lengths[p * per_shard + j * size:p * per_shard + (j + 1) * size])
                      for p in range(shards))
        cost += shards * size * block * max(1, -(-longest // block))
    return cost


@dataclasses.dataclass
class SlotPlan:
    """The sizes of a continuous-batching run."""

    slots: int  # decode slots (the widest set)
    widths: tuple[int, ...]  # the slot sets used, widest first
    capacity: int  # cache entries per slot
    max_prompt: int  # staged prompt length
    staging_rows: int
    buckets: tuple[int, ...]  # prompt lengths the prefill runs at
    # Rows of a prefill call: the data-parallel size times powers of two (a call's rows are
    # split over the data shards, never copied to each).
    prefill_sizes: tuple[int, ...]
    prefill_limits: tuple[int, ...]  # per bucket: the largest prefill size it may use


def plan_slots(config: Any, lengths: list[int], num_samples: int, max_new_tokens: int,
               budget_bytes: int, cache_dtype: str | None, min_bucket: int, data_parallel: int,
               max_slots: int | None = None) -> SlotPlan:
    """Sizes the slots from the memory budget: each slot holds a prompt of the run's longest
    bucket plus `max_new_tokens`, and its next-token logits; the staging rows hold prompts
    waiting for slots. Raises ValueError when the budget is below one slot per data shard.
    A prefill call at a bucket holds as many prompts as `generate.prefill_fit` allows
    (rounded down to a prefill size; at least one per data shard)."""
    buckets = sorted({max(min_bucket, next_power_of_two(n)) for n in lengths})
    max_prompt = buckets[-1]
    capacity = slot_capacity(max_prompt, max_new_tokens)
    logits = config.vocab_size * 4
    per_slot = cache_bytes(config, 1, capacity, cache_dtype) + logits
    per_row = cache_bytes(config, 1, max_prompt, cache_dtype) + logits
    requests = len(lengths) * num_samples
    most_rows = min(MAX_STAGED_PROMPTS, len(lengths)) + 1
    fit = (budget_bytes - most_rows * per_row) // per_slot
    if fit < data_parallel:
        longest = max(range(len(lengths)), key=lambda i: lengths[i])
        raise ValueError(
            f"cache_budget_gb={budget_bytes / 2**30:.4g} ({budget_bytes} bytes) is below "
            f"{data_parallel} decode slot(s) of {per_slot} bytes each: prompt {longest} has "
            f"{lengths[longest]} tokens (bucket {max_prompt}), + {max_new_tokens} new tokens "
            f"= {capacity} cache entries a slot; plus {most_rows} staged prompt(s) of "
            f"{per_row} bytes")
    want = -(-requests // data_parallel) * data_parallel
    if max_slots:
        want = min(want, max(data_parallel, max_slots // data_parallel * data_parallel))
    slots = int(min(fit // data_parallel * data_parallel, want))
    if slots < want:  # some requests wait: whole attention groups (all start at once: as is)
        slots = round_slots(slots, data_parallel)
    widths = [slots]
    narrowings = min(MAX_NARROWINGS, max_new_tokens // NEW_TOKENS_PER_NARROWING)
    while len(widths) <= narrowings and widths[-1] > data_parallel:
        narrower = round_slots(-(-(widths[-1] // NARROWING) // data_parallel) * data_parallel,
                               data_parallel)
        if narrower >= widths[-1] or narrower < 1:
            break
        widths.append(narrower)
    staged = min(MAX_STAGED_PROMPTS, len(lengths), -(-slots // num_samples) + 1)
    per_shard = next_power_of_two(-(-staged // data_parallel))
    sizes = tuple(data_parallel << i for i in range(per_shard.bit_length()))
    fits = [prefill_fit(config, bucket, budget_bytes, cache_dtype) for bucket in buckets]
    limits = tuple(max([s for s in sizes if s <= fit] or sizes[:1]) for fit in fits)
    return SlotPlan(slots, tuple(widths), capacity, max_prompt, staged + 1,
                    tuple(buckets), sizes, limits)


@dataclasses.dataclass
class Finished:
    prompt_index: int
    sample_index: int
    tokens: list[int]
    logprobs: list[float]
    stopped: bool


@dataclasses.dataclass
class EngineStats:
    generated_tokens: int = 0
    slot_steps: int = 0
    decode_steps: int = 0
    device_calls: int = 0


class SlotEngine:
    """Runs one continuous-batching sampling call; see the module docstring.

    `params` are placed for sampling; `put(x, names)` places a host array on the mesh (its
    logical axis names as in `SAMPLING_RULES`).
    """

    def __init__(self, params: Any, program: SlotProgram, plan: SlotPlan,
                 put: Callable[[np.ndarray, tuple[str, ...]], jax.Array]) -> None:
        self.params, self.program, self.plan, self.put = params, program, plan, put

    def _replicated(self, x: np.ndarray) -> jax.Array:
        mesh = self.program.mesh
        if mesh is None:
            return jnp.asarray(x)
        return put_global(x, NamedSharding(mesh, PartitionSpec()))

    def _prefill(self, staging: tuple, token_ids: list[list[int]], prompts: list[int],
                 rows: list[int], bucket: int, size: int) -> tuple:
        ids = np.full((size, bucket), self.program.pad_id, np.int32)
        lengths = np.ones((size,), np.int32)
        where = np.full((size,), self.plan.staging_rows, np.int32)  # padding: no write
        for i, (p, r) in enumerate(zip(prompts, rows)):
            ids[i, :len(token_ids[p])] = token_ids[p]
            lengths[i], where[i] = len(token_ids[p]), r
        return programs.prefill(self.params, *staging, self.put(ids, ("batch", "length")),
                                self._replicated(lengths), self._replicated(where),
                                program=self.program)

    def _insert(self, cache: list, state: dict, staging: tuple, width: int,
                starts: list[tuple[int, int, int, int, int]]) -> tuple:
        size = next_power_of_two(len(starts))
        table = np.zeros((5, size), np.int32)
        table[0] = width  # padding: a slot past the set writes nothing
        for i, start in enumerate(starts):
            table[:, i] = start
        slots, rows, lengths, prompt, sample = (self._replicated(t) for t in table)
        return programs.insert(cache, state, *staging, slots, rows, lengths, prompt, sample,
                               program=self.program)

    def compile(self, token_ids: list[list[int]]) -> None:
        """Runs every program the run can use once, on throwaway inputs."""
        plan, program = self.plan, self.program
        staging = programs.init_staging_jit(program)
        for bucket, limit in zip(plan.buckets, plan.prefill_limits):
            fits = [p for p, t in enumerate(token_ids) if len(t) <= bucket]
            for size in plan.prefill_sizes:
                if size <= limit:
                    staging = self._prefill(staging, token_ids, fits[:1], [0], bucket, size)
        seed = jnp.asarray(0, jnp.uint32)
        cache, state = programs.init_slots_jit(program, plan.widths[0])
        for i, width in enumerate(plan.widths):
            if i == 0:  # requests start only in the widest set (narrowing ends the queue)
                for size in (1 << j for j in range(next_power_of_two(width).bit_length())):
                    cache, state = self._insert(cache, state, staging, width,
                                                [(width, 0, 1, 0, 0)] * size)
            if slot_groups(width, program.shards) > 1:
                order = self._replicated(np.arange(width, dtype=np.int32))
                cache, state = programs.permute(cache, state, order, program=program)
            cache, state, _ = programs.decode_chunk(self.params, cache, state, seed,
                                                   jnp.int32(0), program=program)
            if i + 1 < len(plan.widths):
                keep = self._replicated(np.arange(plan.widths[i + 1], dtype=np.int32))
                cache, state = programs.resize(cache, state, keep, program=program,
                                               slots=plan.widths[i + 1])
        jax.block_until_ready(staging)

    def run(self, token_ids: list[list[int]], num_samples: int, seed: int,
            on_finish: Callable[[Finished, EngineStats], None]) -> EngineStats:
        """Samples `num_samples` rows per prompt; calls `on_finish` for each finished row."""
        plan, program = self.plan, self.program
        queue = collections.deque((p, k) for p in range(len(token_ids))
                                  for k in range(num_samples))
        left = [num_samples] * len(token_ids)  # samples of a prompt not yet in a slot
        staged: dict[int, int] = {}  # prompt -> staging row
        free_rows = list(range(plan.staging_rows))
        width = plan.widths[0]
        holder: list[tuple[int, int] | None] = [None] * width
        rows: dict[tuple[int, int], tuple[list[int], list[float]]] = {}
        staging = programs.init_staging_jit(program)
        cache, state = programs.init_slots_jit(program, width)
        seed_array = jnp.asarray(seed & 0xFFFFFFFF, jnp.uint32)
        stats = EngineStats()
        while queue or any(h is not None for h in holder):
            free = [s for s in range(width) if holder[s] is None]
            if queue and free:
                staging, cache, state = self._refill(queue, left, staged, free_rows, free,
                                                     holder, rows, token_ids, staging, cache,
                                                     state, width)
                free = [s for s in range(width) if holder[s] is None]
            narrower = plan.widths[plan.widths.index(width) + 1] if (
                width != plan.widths[-1]) else None
            cache, state, holder = self._group_by_length(cache, state, holder, rows, token_ids)
            if queue:
                target = len(free) + min(len(queue), max(1, width // 16))
            elif narrower is not None:
                target = width - narrower
            else:
                target = width
            cache, state, out = programs.decode_chunk(self.params, cache, state, seed_array,
                                                      jnp.int32(target), program=program)
            out = host_tree(out)
            steps = int(out["steps"])
            stats.decode_steps += steps
            stats.slot_steps += steps * width
            stats.device_calls += 1
            for s, request in enumerate(holder):
                if request is None:
                    continue
                tokens, logprobs = rows[request]
                new = int(out["emitted"][s])
                tokens.extend(int(t) for t in out["tokens"][s, :new])
                logprobs.extend(float(x) for x in out["logprobs"][s, :new])
                stats.generated_tokens += new
                if not out["active"][s]:
                    holder[s] = None
                    del rows[request]
                    on_finish(Finished(*request, tokens, logprobs, bool(out["stopped"][s])),
                              stats)
            active = sum(h is not None for h in holder)
            if not queue and narrower is not None and active <= narrower:
                keep = [s for s, h in enumerate(holder) if h is not None]
                holder = [holder[s] for s in keep] + [None] * (narrower - len(keep))
                index = np.asarray(keep + [width] * (narrower - len(keep)), np.int32)
                cache, state = programs.resize(cache, state, self._replicated(index),
                                               program=program, slots=narrower)
                width = narrower
        return stats

    def _group_by_length(self, cache: list, state: dict, holder: list, rows: dict,
                         token_ids: list[list[int]]) -> tuple:
        """Reorders the slots longest first when that saves `REORDER_GAIN` of the keys a step
        reads (the copy costs about one step's worth)."""
        shards = self.program.shards
        groups = slot_groups(len(holder), shards)
        if groups == 1:
            return cache, state, holder
        lengths = [0 if h is None else len(token_ids[h[0]]) + len(rows[h][0]) for h in holder]
        block = attention_block(self.program.capacity)
        order = grouped_order(lengths, shards, groups)
        now = attention_cost(lengths, shards, groups, block)
        after = attention_cost([lengths[s] for s in order], shards, groups, block)
        if after > (1 - REORDER_GAIN) * now or order == sorted(order):
            return cache, state, holder
        cache, state = programs.permute(cache, state,
                                        self._replicated(np.asarray(order, np.int32)),
                                        program=self.program)
        return cache, state, [holder[s] for s in order]

    def _refill(self, queue: collections.deque, left: list[int], staged: dict[int, int],
                free_rows: list[int], free: list[int], holder: list, rows: dict,
                token_ids: list[list[int]], staging: tuple, cache: list, state: dict,
                width: int) -> tuple:
        """Starts queued requests in the free slots, prefilling new prompts first."""
        taken: list[tuple[int, int]] = []
        new: list[int] = []
        while queue and len(taken) < len(free):
            prompt, sample = queue[0]
            if prompt not in staged and prompt not in new:
                if len(new) >= min(len(free_rows), MAX_STAGED_PROMPTS):
                    break
                new.append(prompt)
            taken.append(queue.popleft())
        for prompt in new:
            staged[prompt] = free_rows.pop(0)
        by_bucket: dict[int, list[int]] = {}
        for prompt in new:
            bucket = next(b for b in self.plan.buckets if b >= len(token_ids[prompt]))
            by_bucket.setdefault(bucket, []).append(prompt)
        for bucket, group in sorted(by_bucket.items()):
            limit = self.plan.prefill_limits[self.plan.buckets.index(bucket)]
            for first in range(0, len(group), limit):
                part = group[first:first + limit]
                size = next(s for s in self.plan.prefill_sizes if s >= len(part))
                staging = self._prefill(staging, token_ids, part, [staged[p] for p in part],
                                        bucket, size)
        starts = []
        for slot, (prompt, sample) in zip(free, taken):
            starts.append((slot, staged[prompt], len(token_ids[prompt]), prompt, sample))
            holder[slot] = (prompt, sample)
            rows[(prompt, sample)] = ([], [])
            left[prompt] -= 1
            if left[prompt] == 0:
                free_rows.append(staged.pop(prompt))
        free_rows.sort()
        cache, state = self._insert(cache, state, staging, width, starts)
        return staging, cache, state
