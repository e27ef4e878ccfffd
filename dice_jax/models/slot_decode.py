"""One-token decode steps for decode slots, each with its own KV cache and position.

The continuous-batching sampler keeps S slots busy; each slot holds one sequence (its
prompt, then its generated tokens) in its own cache row, at its own length:

    cache[layer][c] = {"k" [R_c, kv_heads, head_dim, block], "v" [R_c, kv_heads, block, head_dim]}
                      (chunk c: indices c*block..; logical `KEY_AXES` / `SEGMENT_AXES`;
                      R_c = S, or the slots of the groups reaching chunk c: `slot_rows`)
    lengths [S] int32: tokens already in each slot's cache

A step feeds one token per slot at cache index `lengths[s]` (also its RoPE position: a
slot's prompt starts at index 0, unpadded) and returns the next-token logits. Attention
reads only the chunks the longest slot of its group needs, with an online (running max)
float32 softmax; separate chunk arrays rather than one sliced array, since a dynamic slice
feeding a matmul is copied first on CPU; keys are stored transposed (block minor), the
layout in which XLA:CPU's batched query-key product runs at memory speed (half the time of
the untransposed one), values as they come; scores are rounded through the compute dtype and
value products accumulate in float32, as in `decoder._attend`. The math is that of
`dice_jax.models.decoder`; the sampler's parity tests compare the two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dice_jax.models.config import ModelConfig
from dice_jax.models.decode import SEGMENT_AXES, Segment, _rope, step_inputs, step_logits
from dice_jax.models.decoder import _MASKED, rms_norm

Array = jax.Array
KEY_AXES = ("batch", "kv_heads", "head_dim", "length")  # a chunk's transposed keys
CHUNK_AXES = {"k": KEY_AXES, "v": SEGMENT_AXES}


def attention_block(capacity: int) -> int:
    """Keys per cache chunk: 64 (128 past 1024 keys, fewer chunks to skip over), or the
    whole cache when it is shorter."""
    return min(64 if capacity <= 1024 else 128, capacity)


def slot_capacity(prompt_tokens: int, max_new_tokens: int) -> int:
    """Cache slots one decode slot needs (a prompt plus all but its last new token), rounded
    up to whole attention blocks."""
    need = prompt_tokens + max_new_tokens
    block = attention_block(need)
    return -(-need // block) * block


MAX_GROUPS = 8  # slot groups per shard, each skipping the chunks past its own longest slot
MIN_GROUP = 4  # slots per group at least


def slot_groups(width: int, shards: int) -> int:
    """Slot groups of a `width`-slot set split over `shards` data shards: a power of two up to
    `MAX_GROUPS` dividing the slots of a shard, with at least `MIN_GROUP` slots a group."""
    per_shard, groups = width // shards, 1
    while (groups * 2 <= MAX_GROUPS and per_shard % (groups * 2) == 0
           and per_shard // (groups * 2) >= MIN_GROUP):
        groups *= 2
    return groups


TIER_HALVINGS = 3  # the shortest tier holds 1/2**3 of the longest one's chunks


def tier_chunks(chunks: int, min_chunks: int, groups: int) -> tuple[int, ...]:
    """Cache chunks each of `groups` attention groups holds in a tiered slot set: groups
    come in `TIER_HALVINGS + 1` equal tiers, tier i holding `ceil(chunks / 2**i)` chunks (at
    least `min_chunks`), so the first tier holds whole sequences and later ones shorter
    ones. Non-increasing; `groups` a multiple of the tier count."""
    tiers = TIER_HALVINGS + 1
    return tuple(max(min_chunks, -(-chunks // 2 ** (j * tiers // groups)))
                 for j in range(groups))


def chunk_groups(group_chunks: tuple[int, ...], c: int) -> int:
    """Groups (per shard) holding chunk `c`: the first ones, as chunks are non-increasing."""
    return sum(n > c for n in group_chunks)


def slot_rows(width: int, shards: int, group_chunks: tuple[int, ...], c: int) -> np.ndarray:
    """Row of each of `width` slots in chunk `c`'s arrays, -1 where the slot's group does
    not hold that chunk, int32 `[width]`. Chunk c stores the slots of its groups only,
    shard by shard: slot (shard p, group j, i) at row `(p * groups_c + j) * n + i`."""
    groups = len(group_chunks)
    n, held = width // (shards * groups), chunk_groups(group_chunks, c)
    slot = np.arange(width)
    p, j, i = slot // (groups * n), slot // n % groups, slot % n
    return np.where(j < held, (p * held + j) * n + i, -1).astype(np.int32)


def slot_limits(width: int, shards: int, group_chunks: tuple[int, ...], block: int
                ) -> np.ndarray:
    """Cache entries each of `width` slots holds (its group's chunks x `block`), int32."""
    groups = len(group_chunks)
    n = width // (shards * groups)
    return (np.asarray(group_chunks)[np.arange(width) // n % groups] * block).astype(np.int32)


def slot_attention(q: Array, chunks: list[Segment], lengths: Array, window: int | None,
                   groups: int = 1, shards: int = 1) -> Array:
    """Attention of one new token per slot over its own cache.

    q `[S, heads, head_dim]`; the cache as chunks of k `[R_c, kv_heads, head_dim, block]` and
    v `[R_c, kv_heads, block, head_dim]` (chunk c holds indices c*block ..), already holding
    the new token at index `lengths - 1`; lengths `[S]` int32 (keys per slot, new token
    included). Keys at index >= length, or `window` or more indices behind the new token,
    are masked.

    The slots of each of `shards` equal data shards form `groups` equal groups (group j of a
    shard: its slots j*n .. (j+1)*n - 1). Chunk c holds the slots of the first `G_c` groups
    of each shard (`R_c = shards * G_c * n` rows, `slot_rows`; `G_c` non-increasing in c: a
    tiered set whose later groups hold shorter sequences; `G_c = groups` everywhere when
    every slot holds the whole cache). A chunk past the longest slot of a group is skipped
    for that group (`lax.cond`), so a step reads about as many keys as the slots hold when
    slots of similar length share a group (the engine orders them so). Returns
    `[S, heads, head_dim]` in q's dtype.
    """
    s, h, d = q.shape
    kv, block = chunks[0]["v"].shape[1], chunks[0]["v"].shape[2]
    g = h // kv
    dtype, f32, scale = q.dtype, jnp.float32, d ** -0.5
    n = s // (shards * groups)
    held = [chunk["v"].shape[0] // (shards * n) for chunk in chunks]

    def split(a: Array, parts: int = groups) -> Array:
        return a.reshape(shards, parts, n, *a.shape[1:])

    qg = split(q.reshape(s, kv, g, d))
    last = split(lengths - 1)

    def add_chunk(carry: tuple[Array, Array, Array], k: Array, v: Array, last: Array,
                  q: Array, start: int) -> tuple[Array, Array, Array]:
        high, total, out = carry  # [P, n, kv, g] / [P, n, kv, g, d]
        index = start + jnp.arange(block)
        allowed = index <= last[..., None]
        if window is not None:
            allowed &= (last[..., None] - index) < window
        scores = jnp.einsum("pnkgd,pnkdc->pnkgc", q, k.astype(dtype)).astype(f32)
        scores = jnp.where(allowed[:, :, None, None, :], scores * scale, _MASKED)
        new_high = jnp.maximum(high, jnp.max(scores, axis=-1))
        rescale = jnp.exp(high - new_high)
        weights = jnp.exp(scores - new_high[..., None])
        total = total * rescale + jnp.sum(weights, axis=-1)
        out = out * rescale[..., None] + jnp.einsum(
            "pnkgc,pnkcd->pnkgd", weights.astype(dtype), v.astype(dtype),
            preferred_element_type=f32)
        return new_high, total, out

    outs = []
    for j in range(groups):
        group_last = last[:, j]
        longest = jnp.max(group_last) + 1
        carry = (jnp.full((shards, n, kv, g), _MASKED, f32),
                 jnp.zeros((shards, n, kv, g), f32), jnp.zeros((shards, n, kv, g, d), f32))
        for c, chunk in enumerate(chunks):
            if held[c] <= j:  # this group's slots end before chunk c
                break

            def step(x, chunk=chunk, c=c, j=j):
                return add_chunk(x, split(chunk["k"], held[c])[:, j],
                                 split(chunk["v"], held[c])[:, j], last[:, j], qg[:, j],
                                 c * block)
            if c == 0:  # every slot holds at least one key
                carry = step(carry)
            else:
                carry = jax.lax.cond(longest > c * block, step, lambda x: x, carry)
        _, total, out = carry
        outs.append(out / total[..., None])
    return jnp.stack(outs, axis=1).astype(dtype).reshape(s, h, d)


def write_slots(chunks: list[Segment], k: Array, v: Array, index: Array, groups: int = 1,
                shards: int = 1) -> list[Segment]:
    """The chunks with each slot's new `k`/`v` `[S, kv, d]` written at its `index [S]`
    (an index past the slot's chunks writes nothing). Chunks hold the slots of their first
    groups, as in `slot_attention`."""
    s = k.shape[0]
    n = s // (shards * groups)
    block = chunks[0]["v"].shape[2]
    out = []
    for c, chunk in enumerate(chunks):
        held = chunk["v"].shape[0] // (shards * n)
        if held < groups:  # the slots of the first `held` groups of each shard
            def mine(a: Array, held: int = held) -> Array:
                return a.reshape(shards, groups, n, *a.shape[1:])[:, :held].reshape(
                    shards * held * n, *a.shape[1:])
            k_c, v_c, index_c = mine(k), mine(v), mine(index)
        else:
            k_c, v_c, index_c = k, v, index
        rows = jnp.arange(k_c.shape[0])
        local = index_c - c * block
        local = jnp.where((local >= 0) & (local < block), local, block)  # block: dropped
        out.append({"k": chunk["k"].at[rows, :, :, local].set(k_c.astype(chunk["k"].dtype),
                                                              mode="drop"),
                    "v": chunk["v"].at[rows, :, local].set(v_c.astype(chunk["v"].dtype),
                                                           mode="drop")})
    return out


def _slot_layer(config: ModelConfig, lp: dict, x: Array, cos: Array, sin: Array,
                cache: list[Segment], lengths: Array, groups: int, shards: int
                ) -> tuple[Array, list[Segment]]:
    """One decoder layer for one token per slot: x `[S, embed]` -> `[S, embed]`; the new
    key/value go to index `lengths` of each slot's cache."""
    s, h, kv, d = x.shape[0], config.num_heads, config.num_kv_heads, config.head_dim
    qkv = rms_norm(x, lp["attn_norm"], config.rms_norm_eps) @ lp["qkv"]
    q = _rope(qkv[:, :h * d].reshape(s, h, d), cos, sin)
    k = _rope(qkv[:, h * d:(h + kv) * d].reshape(s, kv, d), cos, sin)
    v = qkv[:, (h + kv) * d:].reshape(s, kv, d)
    cache = write_slots(cache, k, v, lengths, groups, shards)
    out = slot_attention(q, cache, lengths + 1, config.sliding_window, groups, shards)
    x = x + out.reshape(s, h * d) @ lp["o"]
    gate_up = rms_norm(x, lp["mlp_norm"], config.rms_norm_eps) @ lp["gate_up"]
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return x + (jax.nn.silu(gate) * up) @ lp["down"], cache


def slot_decode_step(config: ModelConfig, params: dict, layers: list[dict], tokens: Array,
                     lengths: Array, cache: list[list[Segment]], groups: int = 1,
                     shards: int = 1) -> tuple[Array, list[list[Segment]]]:
    """Feeds `tokens [S]` at cache index and position `lengths [S]`; returns float32
    next-token logits `[S, vocab]` and the updated per-layer caches. `layers` is
    `decode.split_layers(...)`; `params` supplies the embeddings and the final norm;
    `groups` / `shards` as in `slot_attention`."""
    x, cos, sin = step_inputs(config, params, tokens, lengths)
    new_cache = []
    for lp, segment in zip(layers, cache):
        x, segment = _slot_layer(config, lp, x, cos, sin, segment, lengths, groups, shards)
        new_cache.append(segment)
    return step_logits(config, params, x), new_cache
