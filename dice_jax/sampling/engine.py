"""Continuous batching: a fixed set of decode slots kept busy while requests are left.

`SlotEngine.run` turns prompts x K samples into a queue of (prompt, sample) requests. It
fills every free slot from the queue (prefilling each new prompt once into a staging row,
at most `SlotPlan.prefill_limits` prompts a call so that the call's activations fit the
budget's prefill share, then copying it into the slots of its samples), runs the jitted
`slots.decode_chunk` until enough slots are free again, retires the finished rows and
refills. When the queue is empty the active slots move into a narrower set (2/3 as wide;
once per 160 new tokens a row may take, at most six times: `plan.NARROWING`), so the tail
of long rows does not pay for idle slots. Before each chunk the slots may be reordered
longest first, so that each attention group holds slots of similar length and skips the
cache chunks none of them has reached.

In a tiered set (`plan.plan_slots`: later attention groups hold fewer cache chunks) rows
are kept longest first, so each sits in a slot that holds it; a row that would outgrow its
slot within the next call triggers the reorder, and one that reaches its slot's limit
pauses (no token, same logits) until moved. Sorted lengths fit sorted limits whenever any
placement does, so a reorder never drops a key; a paused row waits for a longer slot to
free. Narrower sets hold whole sequences when the budget allows.

All decisions are made on the host from the gathered chunk outputs, in a fixed
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
from dice_jax.models.slot_decode import slot_groups
from dice_jax.sampling import slots as programs
from dice_jax.sampling.plan import MAX_STAGED_PROMPTS, SlotPlan, next_power_of_two
from dice_jax.sampling.slots import SlotProgram

REORDER_GAIN = 0.1  # reorder the slots when that reads this fraction fewer keys a step


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
                                                   jnp.int32(0), jnp.int32(1),
                                                   program=program)
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
            cache, state, holder = self._place(cache, state, holder, rows, token_ids)
            if queue:
                target = len(free) + min(len(queue), max(1, width // 16))
            elif narrower is not None:
                target = width - narrower
            else:
                target = width
            cache, state, out = programs.decode_chunk(
                self.params, cache, state, seed_array, jnp.int32(target),
                jnp.int32(max(1, width // 16)), program=program)
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
                keep = self._narrowed(holder, rows, token_ids, narrower)
                if keep is not None:
                    holder = [None if s >= width else holder[s] for s in keep]
                    cache, state = programs.resize(
                        cache, state, self._replicated(np.asarray(keep, np.int32)),
                        program=program, slots=narrower)
                    width = narrower
        return stats

    def _lengths(self, holder: list, rows: dict, token_ids: list[list[int]]
                 ) -> tuple[list[int], list[int]]:
        """Per slot: tokens in its cache, and those it may hold by the end of the next
        decode call (0 / 0 when idle)."""
        steps, most = self.program.chunk_steps, self.program.max_new_tokens
        lengths, needs = [], []
        for h in holder:
            made = 0 if h is None else len(rows[h][0])
            lengths.append(0 if h is None else len(token_ids[h[0]]) + made)
            needs.append(0 if h is None else lengths[-1] + min(steps, most - made))
        return lengths, needs

    def _place(self, cache: list, state: dict, holder: list, rows: dict,
               token_ids: list[list[int]]) -> tuple:
        """Reorders the slots longest first when that lets more rows grow through the next
        call in a tiered set (fewer rows pausing at a short tier's limit), or when it saves
        `REORDER_GAIN` of the keys a step reads (the copy costs about one step's worth).
        Longest first keeps every row within its slot's limit: sorted lengths fit sorted
        limits whenever any assignment fits, and the current one does."""
        shards, width = self.program.shards, len(holder)
        groups = slot_groups(width, shards)
        if groups == 1:
            return cache, state, holder
        lengths, needs = self._lengths(holder, rows, token_ids)
        limits = self.program.slot_limits(width)
        block = self.program.block
        order = grouped_order(lengths, shards, groups)
        if order == sorted(order):
            return cache, state, holder
        over = sum(need > limit for need, limit in zip(needs, limits))
        over_after = sum(needs[s] > limit for s, limit in zip(order, limits))
        now = attention_cost(lengths, shards, groups, block)
        after = attention_cost([lengths[s] for s in order], shards, groups, block)
        if over_after >= over and after > (1 - REORDER_GAIN) * now:
            return cache, state, holder
        cache, state = programs.permute(cache, state,
                                        self._replicated(np.asarray(order, np.int32)),
                                        program=self.program)
        return cache, state, [holder[s] for s in order]

    def _narrowed(self, holder: list, rows: dict, token_ids: list[list[int]], narrower: int
                  ) -> list[int] | None:
        """The slots (an index past the set: idle) of the `narrower`-slot set holding the
        active ones, longest first, or None while they do not fit its slot limits."""
        shards = self.program.shards
        lengths, _ = self._lengths(holder, rows, token_ids)
        keep = [s for s, h in enumerate(holder) if h is not None]
        keep += [len(holder)] * (narrower - len(keep))
        kept = [lengths[s] if s < len(holder) else 0 for s in keep]
        order = grouped_order(kept, shards, slot_groups(narrower, shards))
        limits = self.program.slot_limits(narrower)
        if any(kept[s] > limit for s, limit in zip(order, limits)):
            return None
        return [keep[s] for s in order]

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
