"""Sizing a continuous-batching run (`dice_jax.sampling.engine`) from the cache budget.

`plan_slots` picks the decode slots (each holds the run's longest prompt bucket plus
`max_new_tokens` and its next-token logits), the narrower sets the tail moves into, the
staging rows for prefilled prompts and the prefill call sizes. When requests must queue and
a slot holds several cache chunks, the widest set is tiered (`slot_decode.tier_chunks`): its
attention groups come in four tiers holding 1, 1/2, 1/4 and 1/8 of a whole sequence's
chunks (at least the prompt bucket plus one decode call's steps), so up to about twice the
slots fit the budget; the engine keeps each row in a slot that holds it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dice_jax.models.decoder import cache_bytes
from dice_jax.models.slot_decode import (
    MAX_GROUPS,
    MIN_GROUP,
    attention_block,
    slot_capacity,
    tier_chunks,
)
from dice_jax.sampling.generate import prefill_fit

CHUNK_STEPS = 64  # decode steps per device call at most (the host checks in between)
MAX_STAGED_PROMPTS = 16  # new prompts prefilled per refill at most
# Each narrower slot set holds this fraction of the slots: steps of 2/3 rather than 1/2 leave
# fewer idle slots while the tail drains (a simulation of the long workload's trace: slot
# utilisation 0.87 -> 0.94).
NARROWING = (2, 3)
MAX_NARROWINGS = 6  # each narrower set is one more compiled decode program
# One narrowing per this many new tokens a row may take: a shorter tail does not repay the
# compile.
NEW_TOKENS_PER_NARROWING = 160


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
    # (width, cache chunks per attention group) of the tiered sets (`SlotProgram.tiers`)
    tiers: tuple[tuple[int, tuple[int, ...]], ...] = ()


def plan_slots(config: Any, lengths: list[int], num_samples: int, max_new_tokens: int,
               budget_bytes: int, cache_dtype: str | None, min_bucket: int, data_parallel: int,
               max_slots: int | None = None, tiered_slots: bool = True) -> SlotPlan:
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
    block = attention_block(capacity)
    chunk_bytes = cache_bytes(config, 1, block, cache_dtype)
    # Chunks a slot of the shortest tier holds: its prompt and one decode call's tokens.
    least = -(-(max_prompt + min(CHUNK_STEPS, max_new_tokens)) // block)
    tiered = tier_chunks(capacity // block, least, MAX_GROUPS)
    spare = budget_bytes - most_rows * per_row

    unit = data_parallel * (sum(tiered) * chunk_bytes + MAX_GROUPS * logits)

    def tiered_fit(cap: int) -> int:
        """The widest tiered set within the budget and `cap` slots (0: none)."""
        n = min(spare // unit, cap // (MAX_GROUPS * data_parallel))
        return int(n * MAX_GROUPS * data_parallel) if n >= MIN_GROUP else 0

    tiers = []
    if tiered_slots and slots < want and tiered[-1] < tiered[0]:
        # A queue waits: a tiered set (later attention groups hold shorter sequences, the
        # engine moves a row up as it grows) holds more rows in the same memory.
        wide = tiered_fit(want)
        if wide > slots:
            slots = wide
            tiers.append((wide, tiered))
    whole = round_slots(int(fit // data_parallel * data_parallel), data_parallel)
    widths = [slots]
    narrowings = min(MAX_NARROWINGS, max_new_tokens // NEW_TOKENS_PER_NARROWING)
    while len(widths) <= narrowings and widths[-1] > data_parallel:
        part, whole_parts = NARROWING
        narrower = round_slots(-(-(widths[-1] * part // whole_parts) // data_parallel)
                               * data_parallel, data_parallel)
        if narrower > whole:  # whole caches do not fit: tiered, or as many as fit
            if tiered_fit(narrower) == narrower:
                tiers.append((narrower, tiered))
            else:
                narrower = whole
        if narrower >= widths[-1] or narrower < 1:
            break
        widths.append(narrower)
    staged = min(MAX_STAGED_PROMPTS, len(lengths), -(-slots // num_samples) + 1)
    per_shard = next_power_of_two(-(-staged // data_parallel))
    sizes = tuple(data_parallel << i for i in range(per_shard.bit_length()))
    fits = [prefill_fit(config, bucket, budget_bytes, cache_dtype) for bucket in buckets]
    limits = tuple(max([s for s in sizes if s <= fit] or sizes[:1]) for fit in fits)
    return SlotPlan(slots, tuple(widths), capacity, max_prompt, staged + 1,
                    tuple(buckets), sizes, limits, tuple(tiers))
