"""The jitted programs of the continuous-batching sampler (`dice_jax.sampling.engine`).

A run keeps S decode slots (`SlotProgram.slots`, a multiple of the data-parallel size), each
holding one (prompt, sample) request:

    cache    per layer, per chunk c {"k" [R_c, kv_heads, head_dim, block] (transposed),
             "v" [R_c, kv_heads, block, head_dim]}: indices c*block.. of each slot's
             sequence (its prompt at index 0..); R_c = S, or in a tiered set
             (`SlotProgram.tiers`) the slots of the attention groups that reach chunk c
             (`slot_decode.slot_rows`), so later groups hold shorter sequences
    state    logits [S, vocab] float32 (next-token logits, ready to sample), lengths [S]
             (tokens in the cache), generated [S] (tokens sampled), active [S] bool,
             prompt_index [S], sample_index [S]
    staging  per layer {"k", "v"} [R, kv_heads, max_prompt, head_dim] + logits [R, vocab]:
             prefilled prompts waiting for free slots

`prefill` runs n new prompts (right-padded to a power-of-two length) once and writes their
cache and last logits into staging rows; `insert` copies staging rows into free slots (the
K samples of a prompt share its one prefill); `decode_chunk` samples and feeds one token per
active slot per step, until `max_steps` steps or until `free_target` slots are free;
`resize` moves the active slots into a narrower (or wider) set when the queue runs dry;
`permute` reorders the slots so that slots of similar length share an attention group
(`slot_decode.slot_attention` skips the chunks past each group's longest slot) and, in a
tiered set, so that a row about to outgrow its slot moves to a longer one (a row at its
slot's limit pauses in `decode_chunk` until then).

A sample's token t is drawn with `fold_in(fold_in(fold_in(key(seed), prompt), sample), t)`,
the static sampler's keys, so a sample depends only on (seed, prompt index, sample index):
never on its slot, the number of slots, the batch or the device count.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dice_jax.models.config import ModelConfig
from dice_jax.models.decode import prompt_segments, split_layers
from dice_jax.models.decoder import Decoder, init_cache
from dice_jax.models.slot_decode import (
    CHUNK_AXES,
    attention_block,
    chunk_groups,
    slot_decode_step,
    slot_groups,
    slot_limits,
    slot_rows,
)
from dice_jax.sampling.distributions import Distribution, next_tokens, token_logprobs
from dice_jax.sampling.generate import SAMPLING_RULES, Program, constrain
from dice_jax.sharding import Rules

Array = jax.Array
Cache = list[list[dict]]  # per layer, per chunk {"k", "v"}


@dataclasses.dataclass(frozen=True)
class SlotProgram:
    """Everything static about the compiled slot programs (hashable, a jit key)."""

    config: ModelConfig
    dist: Distribution
    max_new_tokens: int
    stop_ids: tuple[int, ...]
    capacity: int  # cache entries per slot
    max_prompt: int  # staged prompt length (the longest prompt bucket of the run)
    staging_rows: int
    chunk_steps: int  # decode steps per `decode_chunk` call at most
    # (width, chunks per attention group) of each tiered slot set; other sets: whole caches
    tiers: tuple[tuple[int, tuple[int, ...]], ...] = ()
    pad_id: int = 0
    cache_dtype: str | None = None
    mesh: Mesh | None = None
    rules: Rules = SAMPLING_RULES

    @property
    def shards(self) -> int:
        """Data shards the slots are split over."""
        if self.mesh is None:
            return 1
        return int(self.mesh.shape.get("data", 1) * self.mesh.shape.get("fsdp", 1))

    @property
    def block(self) -> int:
        """Keys per cache chunk."""
        return attention_block(self.capacity)

    @property
    def chunks(self) -> int:
        """Cache chunks of a whole slot."""
        return self.capacity // self.block

    def group_chunks(self, width: int) -> tuple[int, ...]:
        """Cache chunks each attention group of the `width`-slot set holds."""
        for tiered, chunks in self.tiers:
            if tiered == width:
                return chunks
        return (self.chunks,) * slot_groups(width, self.shards)

    def slot_limits(self, width: int) -> np.ndarray:
        """Cache entries each slot of the `width`-slot set holds, int32 `[width]`."""
        return slot_limits(width, self.shards, self.group_chunks(width), self.block)

    @property
    def placement(self) -> Program:
        """The static sampler's program, for its `constrain` placement helper."""
        return Program(self.config, self.dist, 1, self.max_new_tokens, self.stop_ids,
                       mesh=self.mesh, rules=self.rules)


def _pin_layer(layer: list[dict], program: SlotProgram) -> list[dict]:
    return [{n: constrain(chunk[n], CHUNK_AXES[n], program.placement) for n in ("k", "v")}
            for chunk in layer]


def _pin_cache(cache: Cache, program: SlotProgram) -> Cache:
    return [_pin_layer(layer, program) for layer in cache]


def _pin_state(state: dict, program: SlotProgram) -> dict:
    out = {n: constrain(a, ("batch",), program.placement) for n, a in state.items()
           if n != "logits"}
    out["logits"] = constrain(state["logits"], ("batch", "vocab"), program.placement)
    return out


def init_slots(program: SlotProgram, slots: int) -> tuple[Cache, dict]:
    """Zeroed caches and an all-idle state for `slots` slots (chunk c holding the slots of
    the groups that reach it, `program.group_chunks`)."""
    cfg = program.config
    block = program.block
    group_chunks = program.group_chunks(slots)
    per_group = slots // len(group_chunks)
    dtype = jnp.dtype(program.cache_dtype or cfg.dtype)

    def chunk(c: int) -> dict:
        rows = per_group * chunk_groups(group_chunks, c)
        return {"k": jnp.zeros((rows, cfg.num_kv_heads, cfg.head_dim, block), dtype),
                "v": jnp.zeros((rows, cfg.num_kv_heads, block, cfg.head_dim), dtype)}

    cache = [[chunk(c) for c in range(program.chunks)]
             for _ in range(cfg.num_layers)]
    zeros = jnp.zeros((slots,), jnp.int32)
    state = {"logits": jnp.zeros((slots, cfg.vocab_size), jnp.float32), "lengths": zeros,
             "generated": zeros, "active": jnp.zeros((slots,), bool), "prompt_index": zeros,
             "sample_index": zeros}
    return _pin_cache(cache, program), _pin_state(state, program)


init_slots_jit = jax.jit(init_slots, static_argnums=(0, 1))


def init_staging(program: SlotProgram) -> tuple[Cache, Array]:
    """Zeroed staging rows: per layer `[R, kv_heads, max_prompt, head_dim]`, logits
    `[R, vocab]`."""
    cfg = program.config
    shape = (program.staging_rows, cfg.num_kv_heads, program.max_prompt, cfg.head_dim)
    dtype = jnp.dtype(program.cache_dtype or cfg.dtype)
    staging = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
               for _ in range(cfg.num_layers)]
    return staging, jnp.zeros((program.staging_rows, cfg.vocab_size), jnp.float32)


init_staging_jit = jax.jit(init_staging, static_argnums=(0,))


@functools.partial(jax.jit, static_argnames=("program",),
                   donate_argnames=("staging", "staging_logits"))
def prefill(params: Any, staging: Cache, staging_logits: Array, input_ids: Array,
            prompt_lengths: Array, rows: Array, *, program: SlotProgram
            ) -> tuple[Cache, Array]:
    """Prompts `[n, P]` (right-padded; `prompt_lengths [n]` real tokens, at positions
    0..) -> their per-layer cache and float32 logits after the last real token, written to
    staging rows `rows [n]` (a row >= R writes nothing: padding)."""
    cfg = program.config
    n, length = input_ids.shape
    index = jnp.arange(length)[None, :]
    mask = (index < prompt_lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(index, (n, length))
    hidden, cache = Decoder(cfg).apply(
        {"params": params}, input_ids, positions, mask,
        init_cache(cfg, n, length, program.cache_dtype), 0, return_hidden=True,
        method=Decoder.extend)
    last = jnp.take_along_axis(hidden, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    logits = Decoder(cfg).apply({"params": params}, last, method=Decoder.logits)
    staging = [{n_: s[n_].at[rows, :, :length].set(seg[n_].astype(s[n_].dtype), mode="drop")
                for n_ in ("k", "v")}
               for s, seg in zip(staging, prompt_segments(cache))]
    staging_logits = staging_logits.at[rows].set(logits.astype(jnp.float32), mode="drop")
    return staging, staging_logits


@functools.partial(jax.jit, static_argnames=("program",), donate_argnames=("cache", "state"))
def insert(cache: Cache, state: dict, staging: Cache, staging_logits: Array, slots: Array,
           rows: Array, prompt_lengths: Array, prompt_index: Array, sample_index: Array, *,
           program: SlotProgram) -> tuple[Cache, dict]:
    """Starts requests in slots: slot `slots[i]` gets staging row `rows[i]` (its prompt's
    cache and logits), length `prompt_lengths[i]`, and (prompt_index, sample_index)[i]. All
    `[f]` int32; a slot >= S writes nothing (padding)."""
    p, block = program.max_prompt, program.block
    width = state["active"].shape[0]

    def fill(chunk: dict, stage: dict, start: int) -> dict:
        if start >= p:
            return chunk
        if chunk["v"].shape[0] != width:  # `plan_slots` gives every tier the prompt's chunks
            raise ValueError(f"cache chunk at {start} holds {chunk['v'].shape[0]} of {width} "
                             f"slots: a staged prompt of {p} tokens needs it in every slot")
        end = min(start + block, p)
        keys = jnp.swapaxes(stage["k"][rows, :, start:end], -1, -2)
        return {"k": chunk["k"].at[slots, :, :, :end - start].set(keys, mode="drop"),
                "v": chunk["v"].at[slots, :, :end - start].set(stage["v"][rows, :, start:end],
                                                              mode="drop")}

    cache = [[fill(chunk, stage, c * block) for c, chunk in enumerate(layer)]
             for layer, stage in zip(cache, staging)]
    put = lambda a, v: a.at[slots].set(v, mode="drop")  # noqa: E731
    state = {"logits": put(state["logits"], staging_logits[rows]),
             "lengths": put(state["lengths"], prompt_lengths),
             "generated": put(state["generated"], jnp.zeros_like(slots)),
             "active": put(state["active"], jnp.ones(slots.shape, bool)),
             "prompt_index": put(state["prompt_index"], prompt_index),
             "sample_index": put(state["sample_index"], sample_index)}
    return _pin_cache(cache, program), _pin_state(state, program)


def _chunk_sources(program: SlotProgram, old: int, keep: Array) -> list[Array]:
    """Per chunk c, the row of the current (`old`-slot) chunk each row of the new set's
    chunk c copies: new slot i takes old slot `keep[i]` (past `old`: idle, any row)."""
    new = keep.shape[0]
    old_chunks, new_chunks = program.group_chunks(old), program.group_chunks(new)
    sources = []
    for c in range(program.chunks):
        new_rows = slot_rows(new, program.shards, new_chunks, c)
        # A slot without chunk c in its old group has fewer keys than the chunk starts at:
        # any row will do (masked), row 0.
        old_rows = np.maximum(np.append(slot_rows(old, program.shards, old_chunks, c), -1), 0)
        slots = np.nonzero(new_rows >= 0)[0]  # the new slot of each row, in row order
        sources.append(jnp.asarray(old_rows)[jnp.minimum(keep[slots], old)])
    return sources


def _take_layer(layer: list[dict], sources: list[Array], program: SlotProgram) -> list[dict]:
    return _pin_layer([{n: jnp.take(chunk[n], rows, axis=0) for n in ("k", "v")}
                       for chunk, rows in zip(layer, sources)], program)


def _take_slots(cache: Cache, state: dict, keep: Array, program: SlotProgram
                ) -> tuple[Cache, dict]:
    width = state["active"].shape[0]
    valid = keep < width
    sources = _chunk_sources(program, width, keep)
    cache = [_take_layer(layer, sources, program) for layer in cache]
    take = lambda a: jnp.take(a, jnp.minimum(keep, width - 1), axis=0)  # noqa: E731
    state = {n: take(a) for n, a in state.items()}
    state["active"] = state["active"] & valid
    state["lengths"] = jnp.where(state["active"], state["lengths"], 0)
    return cache, _pin_state(state, program)


@functools.partial(jax.jit, static_argnames=("program", "slots"))
def resize(cache: Cache, state: dict, keep: Array, *, program: SlotProgram, slots: int
           ) -> tuple[Cache, dict]:
    """A `slots`-wide set holding slots `keep [slots]` of the current one, in that order
    (an index past the current width gives an idle slot)."""
    del slots  # the width is keep's length; static so that each width is its own program
    return _take_slots(cache, state, keep, program)


@functools.partial(jax.jit, static_argnames=("program",), donate_argnames=("layer",))
def permute_layer(layer: list[dict], order: Array, *, program: SlotProgram) -> list[dict]:
    """One layer's chunks with their slots reordered: new slot i is old slot `order[i]`."""
    return _take_layer(layer, _chunk_sources(program, order.shape[0], order), program)


@functools.partial(jax.jit, static_argnames=("program",), donate_argnames=("state",))
def permute_state(state: dict, order: Array, *, program: SlotProgram) -> dict:
    """The state's slots reordered as `permute_layer` reorders the cache."""
    return _pin_state({n: jnp.take(a, order, axis=0) for n, a in state.items()}, program)


def permute(cache: Cache, state: dict, order: Array, *, program: SlotProgram
            ) -> tuple[Cache, dict]:
    """The same slots reordered: new slot i is old slot `order[i]` (`order` a permutation).

    One program call per layer, each donating its layer: a gather cannot write over its
    own input, and as one program XLA kept a whole second cache alive for it."""
    return ([permute_layer(layer, order, program=program) for layer in cache],
            permute_state(state, order, program=program))


@functools.partial(jax.jit, static_argnames=("program",), donate_argnames=("cache", "state"))
def decode_chunk(params: Any, cache: Cache, state: dict, seed: Array, free_target: Array,
                 pause_target: Array, *, program: SlotProgram) -> tuple[Cache, dict, dict]:
    """Up to `chunk_steps` steps over all slots; each step samples one token per active slot
    from its logits and feeds it. A slot stops after a stop token or `max_new_tokens`
    tokens. A slot whose cache is full (its length at `program.slot_limits`: a tiered set's
    shorter tier) pauses, keeping its logits, until the host moves it to a longer slot.
    Leaves early once `free_target` (int32) slots are idle, once `pause_target` more slots
    have paused, or once a slot frees while some slot is paused.

    Returns the caches, the state, and `tokens [S, chunk_steps]` int32 / `logprobs` float32
    (untempered policy log-probs) of the tokens sampled this call (pad / 0 where a slot was
    idle), `stopped [S]` (a stop token ended the slot this call), `emitted [S]` (tokens
    each slot sampled this call: the first ones of its row of `tokens`), `active [S]` and
    `steps`.
    """
    cfg, dist, steps_max = program.config, program.dist, program.chunk_steps
    width = state["active"].shape[0]
    layers = split_layers(params, cfg)
    stop_ids = jnp.asarray(program.stop_ids, jnp.int32)
    limits = jnp.asarray(program.slot_limits(width))
    base = jax.random.key(seed)
    keys = jax.vmap(lambda p, k: jax.random.fold_in(jax.random.fold_in(base, p), k))(
        state["prompt_index"], state["sample_index"])
    place = program.placement
    generated = state["generated"]
    groups, shards = slot_groups(width, program.shards), program.shards

    def pausing(state: dict) -> Array:
        return state["active"] & (state["lengths"] >= limits)

    def counts(state: dict) -> tuple[Array, Array]:
        free = width - jnp.sum(state["active"].astype(jnp.int32))
        return free, jnp.sum(pausing(state).astype(jnp.int32))

    free_before, paused_before = counts(state)

    def running(carry: tuple) -> Array:
        step, state = carry[0], carry[2]
        free, paused = counts(state)
        return ((step < steps_max) & (free < free_target)
                & (paused - paused_before < pause_target)
                & ~((paused > 0) & (free > free_before)))

    def body(carry: tuple) -> tuple:
        step, cache, state, tokens, logprobs, stopped = carry
        paused = pausing(state)
        active = state["active"] & ~paused
        step_keys = jax.vmap(jax.random.fold_in)(keys, state["generated"])
        token = next_tokens(state["logits"], step_keys, dist)
        logprob = jnp.where(active, token_logprobs(state["logits"], token), 0.0)
        token = constrain(jnp.where(active, token, program.pad_id), ("batch",), place)
        generated = state["generated"] + active.astype(jnp.int32)
        is_stop = active & jnp.isin(token, stop_ids)
        still = active & ~is_stop & (generated < program.max_new_tokens)
        # A paused slot's length is its limit: its write falls past its chunks (dropped).
        logits, cache = slot_decode_step(cfg, params, layers, token, state["lengths"], cache,
                                         groups, shards)
        # An idle slot's length drops to 0, so its group reads no chunk for it.
        state = dict(state, logits=jnp.where(still[:, None], logits, state["logits"]),
                     lengths=jnp.where(still, state["lengths"] + 1,
                                       jnp.where(paused, state["lengths"], 0)),
                     generated=generated, active=still | paused)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, step, axis=1)
        logprobs = jax.lax.dynamic_update_index_in_dim(logprobs, logprob, step, axis=1)
        return (step + 1, _pin_cache(cache, program), _pin_state(state, program), tokens,
                logprobs, stopped | is_stop)

    carry = (jnp.int32(0), cache, state,
             jnp.full((width, steps_max), program.pad_id, jnp.int32),
             jnp.zeros((width, steps_max), jnp.float32), jnp.zeros((width,), bool))
    steps, cache, state, tokens, logprobs, stopped = jax.lax.while_loop(running, body, carry)
    out = {"tokens": tokens, "logprobs": logprobs, "stopped": stopped, "steps": steps,
           "active": state["active"], "emitted": state["generated"] - generated}
    return cache, state, out
