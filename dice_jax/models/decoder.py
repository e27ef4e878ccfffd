"""The Llama-3 / Mistral decoder in Flax linen.

Parameters form a plain nested dict, laid out as below (`rules_for` in
`dice_jax.checkpoints.mapping` maps each entry to its Hugging Face tensor):

    embed [vocab, embed]
    layers/attn_norm [layers, embed]           layers/mlp_norm [layers, embed]
    layers/attn/{q,k,v}_proj [layers, embed, (kv_)heads, head_dim]
    layers/attn/o_proj [layers, heads, head_dim, embed]
    layers/mlp/{gate,up}_proj [layers, embed, mlp]   layers/mlp/down_proj [layers, mlp, embed]
    final_norm [embed]                          lm_head [embed, vocab] (untied models only)

Every projection is one 2-D matmul on flattened tokens (`project`); the parameters keep
their multi-dimensional shapes. Layers are stacked along a leading `layers` axis and run
with `nn.scan`, so XLA compiles one layer whatever the depth; the backward pass keeps only
the weight matmuls' outputs per layer (or nothing with `remat=True`). Every parameter and
large activation carries logical axis names; `dice_jax.sharding` maps them to mesh axes.

Choices made for speed on XLA:CPU, each explained where it is made: attention in causal
query blocks when the query slots are known at trace time (`grouped_attention`), the
softmax's row sums taken from the value product (`_attend`), a target token's logit read
from its embedding row (`Decoder.target_logits`), and the per-token parts run on packed
real tokens when given a `Packing` (`dice_jax.models.packing`).

For generation the decoder takes an optional KV cache (`init_cache`, `Decoder.extend`): a dict
of `k` and `v` arrays `[layers, batch, cache_len, kv_heads, head_dim]` (logical axes
`CACHE_AXES`) that goes through the same `nn.scan` as a scanned input and output, one layer's
slice per step. The sampler prefills with it; its token-by-token loop uses
`dice_jax.models.decode` instead (unrolled layers, per-layer cache buffers shared across the
K samples of a prompt), which is several times faster per step on CPU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dice_jax.models.config import ModelConfig
from dice_jax.models.packing import Packing, pack, unpack
from dice_jax.models.rope import apply_rope, inverse_frequencies, rope_cos_sin

Array = jax.Array
_INIT = nn.initializers.normal(stddev=0.02)
# Finite, so a query that may see no key (a left-pad slot) gives a uniform row, not NaN.
_MASKED = float(jnp.finfo(jnp.float32).min)
CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")
KVCache = dict  # {"k": Array, "v": Array}, each [layers, batch, cache_len, kv_heads, head_dim]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class StaticSlot:
    """A cache slot known when tracing, as `extend` hands it to the layers. `nn.scan` turns
    a Python int argument into a traced array; this wrapper is a pytree with no leaves, so
    each layer still sees the int and attention can skip the keys after the chunk."""

    slot: int


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
           init: Any = _INIT) -> Array:
    """A parameter with logical axis names, cast to the compute dtype on use."""
    cfg: ModelConfig = module.config
    value = module.param(name, nn.with_logical_partitioning(init, axes), shape,
                         jnp.dtype(cfg.param_dtype))
    return jnp.asarray(value, jnp.dtype(cfg.dtype))


def project(x: Array, w: Array, n_in: int = 1) -> Array:
    """`x [..., *w.shape[:n_in]]` times `w` -> `[..., *w.shape[n_in:]]`, as ONE 2-D matmul.

    Tokens are flattened to rows and the weight to `[in, out]`, so the backward pass is two
    plain 2-D matmuls too: on XLA CPU a multi-dimensional einsum's weight gradient inside
    the layer scan went through large transposing copies (about a third of the step).
    """
    k = math.prod(w.shape[:n_in])
    lead = x.shape[:x.ndim - n_in]
    y = x.reshape(math.prod(lead), k) @ w.reshape(k, -1)
    return y.reshape(*lead, *w.shape[n_in:])


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """RMSNorm over the last axis, computed in float32 as HF does, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * x32.astype(x.dtype)


def attention_allowed(positions_q: Array, positions_k: Array, key_valid: Array,
                      sliding_window: int | None) -> Array:
    """Which keys each query may attend to, bool `[batch, 1, 1, q_len, k_len]`.

    `positions_*` are slot indices `[batch, len]` (causality and the sliding window are
    measured in slots, as HF does); `key_valid [batch, k_len]` masks padding.
    """
    q = positions_q[:, :, None]
    k = positions_k[:, None, :]
    allowed = (k <= q) & key_valid[:, None, :].astype(bool)
    if sliding_window is not None:
        allowed &= (q - k) < sliding_window
    return allowed[:, None, None, :, :]


def _attend(q: Array, k: Array, v: Array, allowed: Array) -> Array:
    """Grouped-query attention of one block of queries against its keys, float32 softmax.

    Shapes as in `grouped_attention`. The query heads of each kv head are laid out as one
    `[groups * q_len]` axis, so both dots are plain batched matmuls over `(batch, kv_heads)`
    and neither their outputs nor the `[.., q_len, k_len]` scores need a transposing copy.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    qh = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [batch, kv_heads, k_len, d]
    scores = jnp.einsum("bkqd,bksd->bkqs", qh * (d ** -0.5), kh).astype(jnp.float32)
    scores = jnp.where(allowed, scores.reshape(b, kv, g, t, -1), _MASKED)
    # The softmax is normalised after the value product (on [.., q_len, head_dim], not on
    # the [.., q_len, k_len] weights), and its row sums come out of that product too: a
    # column of ones appended to the values costs 1/head_dim more matmul, where a separate
    # reduction over the [.., q_len, k_len] weights costs XLA CPU more than the matmul.
    weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    vh = jnp.concatenate([vh, jnp.ones((*vh.shape[:-1], 1), vh.dtype)], axis=-1)
    out = jnp.einsum("bkqs,bksd->bkqd", weights.astype(v.dtype).reshape(b, kv, g * t, -1), vh,
                     preferred_element_type=jnp.float32)  # [b, kv, g * t, d + 1]
    out = (out[..., :d] / out[..., d:]).astype(v.dtype).reshape(b, kv, g, t, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def query_blocks(q_len: int) -> int:
    """Queries per causal block: at least 64, at most 8 blocks."""
    return max(64, -(-q_len // 8))


def grouped_attention(q: Array, k: Array, v: Array, allowed: Array,
                      query_offset: int | None = None) -> Array:
    """Grouped-query attention with a float32 softmax.

    q `[batch, q_len, heads, head_dim]`, k/v `[batch, k_len, kv_heads, head_dim]`,
    allowed `[batch, 1, 1, q_len, k_len]` -> `[batch, q_len, heads, head_dim]`.

    `query_offset` (a static int, or None when unknown): query i sits at key slot
    `query_offset + i` and may see no later key (causal). The queries then run in blocks
    (`query_blocks`), each against the keys up to its last query only, which skips most
    of the scores causality masks anyway (5/8 of the work for 4 blocks). Same result for
    every query that may see a key (a dropped key has probability exactly 0); a query
    that sees none (a padding slot, whose output nothing reads) averages its block's
    values instead of all values.
    """
    t, k_len = q.shape[1], k.shape[1]
    step = query_blocks(t)
    if query_offset is None or t <= step:
        return _attend(q, k, v, allowed)
    if query_offset + t > k_len:
        raise ValueError(f"queries at slots {query_offset}..{query_offset + t - 1} but only "
                         f"{k_len} keys")
    outs = []
    for start in range(0, t, step):
        end = min(start + step, t)
        keys = query_offset + end
        outs.append(_attend(q[:, start:end], k[:, :keys], v[:, :keys],
                            allowed[..., start:end, :keys]))
    return jnp.concatenate(outs, axis=1)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, allowed: Array,
                 cache_index: Array | int | StaticSlot | None = None,
                 cache: KVCache | None = None,
                 packing: Packing | None = None) -> tuple[Array, KVCache | None]:
        """Without `cache`, attends within `x`. With one layer's `cache` (`[batch, cache_len,
        kv_heads, head_dim]` each), writes this chunk's keys/values at slot `cache_index`
        and attends over the whole cache (`allowed` is then `[..., q_len, cache_len]`).
        A Python-int (or `StaticSlot`) `cache_index` is static: attention then skips the
        keys after the chunk's last slot (`grouped_attention`'s causal blocks). With
        `packing`, `x`, `cos`, `sin` hold packed tokens (`models.packing`): the projections
        and RoPE run on them, attention on the padded layout."""
        cfg = self.config
        if isinstance(cache_index, StaticSlot):
            cache_index = cache_index.slot
        e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = project(x, _param(self, "q_proj", (e, h, d), ("embed", "heads", "head_dim")))
        k = project(x, _param(self, "k_proj", (e, kv, d), ("embed", "kv_heads", "head_dim")))
        v = project(x, _param(self, "v_proj", (e, kv, d), ("embed", "kv_heads", "head_dim")))
        q = nn.with_logical_constraint(apply_rope(q, cos, sin),
                                       ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(apply_rope(k, cos, sin),
                                       ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        if packing is not None:
            q, k, v = (unpack(a, packing) for a in (q, k, v))
        if cache is not None:
            names = CACHE_AXES[1:]
            k = nn.with_logical_constraint(jax.lax.dynamic_update_slice_in_dim(
                cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1), names)
            v = nn.with_logical_constraint(jax.lax.dynamic_update_slice_in_dim(
                cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1), names)
            cache = {"k": k, "v": v}
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        offset = 0 if cache is None else cache_index if isinstance(cache_index, int) else None
        out = grouped_attention(q, k, v, allowed, offset)
        if packing is not None:
            out = pack(out, packing)
        o_proj = _param(self, "o_proj", (h, d, e), ("heads", "head_dim", "embed"))
        return project(out, o_proj, 2), cache


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        e, m = cfg.hidden_size, cfg.intermediate_size
        gate = project(x, _param(self, "gate_proj", (e, m), ("embed", "mlp")))
        up = project(x, _param(self, "up_proj", (e, m), ("embed", "mlp")))
        hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return project(hidden, _param(self, "down_proj", (m, e), ("mlp", "embed")))


class DecoderLayer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, allowed: Array,
                 cache_index: Array | int | StaticSlot | None = None,
                 cache: KVCache | None = None,
                 packing: Packing | None = None) -> tuple[Array, KVCache | None]:
        cfg = self.config
        ones = nn.initializers.ones
        norm = _param(self, "attn_norm", (cfg.hidden_size,), ("embed",), ones)
        h, cache = Attention(cfg, name="attn")(rms_norm(x, norm, cfg.rms_norm_eps), cos, sin,
                                               allowed, cache_index, cache, packing)
        x = x + h
        norm = _param(self, "mlp_norm", (cfg.hidden_size,), ("embed",), ones)
        x = x + MLP(cfg, name="mlp")(rms_norm(x, norm, cfg.rms_norm_eps))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), cache


class Decoder(nn.Module):
    """Token ids -> next-token logits for a padded batch.

    `__call__(input_ids [batch, length] int, positions [batch, length] int,
    attention_mask [batch, length] 0/1)`; returns logits `[batch, length, vocab]` in the
    compute dtype, or with `return_hidden=True` the final normed hidden states
    `[batch, length, embed]` so a caller can project to the vocabulary in chunks
    (`Decoder.apply(..., method=Decoder.logits)`). `extend` runs new tokens against a KV
    cache (`Decoder.apply(..., method=Decoder.extend)`).
    """

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        # remat=True recomputes each layer whole in the backward pass. Otherwise only the
        # outputs of the weight matmuls are kept, and the cheap rest (norms, RoPE, attention
        # scores and softmax, SiLU) is recomputed: the same math in less activation memory,
        # which is also faster on CPU (a third fewer freshly allocated pages per step).
        policy = None if cfg.remat else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        layer = nn.remat(DecoderLayer, prevent_cse=False, policy=policy)
        self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast, nn.broadcast, nn.broadcast,
                                       nn.broadcast, 0, nn.broadcast),
                              length=cfg.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        self.embed = self.param("embed", nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
                                (cfg.vocab_size, cfg.hidden_size), jnp.dtype(cfg.param_dtype))
        self.final_norm = self.param("final_norm", nn.with_logical_partitioning(
            nn.initializers.ones, ("embed",)), (cfg.hidden_size,), jnp.dtype(cfg.param_dtype))
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param("lm_head", nn.with_logical_partitioning(
                _INIT, ("embed", "vocab")), (cfg.hidden_size, cfg.vocab_size),
                jnp.dtype(cfg.param_dtype))

    def __call__(self, input_ids: Array, positions: Array, attention_mask: Array,
                 return_hidden: bool = False) -> Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        x = jnp.take(jnp.asarray(self.embed, dtype), input_ids, axis=0)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        slots = jnp.broadcast_to(jnp.arange(input_ids.shape[1])[None], input_ids.shape)
        allowed = attention_allowed(slots, slots, attention_mask, cfg.sliding_window)
        cos, sin = rope_cos_sin(positions, inverse_frequencies(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        x, _ = self.layers(x, cos, sin, allowed, None, None, None)
        x = rms_norm(x, jnp.asarray(self.final_norm, dtype), cfg.rms_norm_eps)
        if return_hidden:
            return x
        return self.logits(x)

    def extend(self, input_ids: Array, positions: Array, kv_mask: Array, cache: KVCache,
               cache_index: Array | int, return_hidden: bool = False,
               packing: Packing | None = None) -> tuple[Array, KVCache]:
        """Runs a chunk of new tokens against a KV cache (prefill, then one token a step).

        input_ids/positions `[batch, q_len]` occupy cache slots `cache_index ..
        cache_index + q_len - 1` (one slot index for the whole batch: prompts are
        left-padded; a Python int where it is known when tracing, as in prefill and
        scoring, lets attention skip the slots after the chunk). `kv_mask [batch,
        cache_len]` 0/1 marks the slots that hold real tokens (slots not yet written may be
        1: causality hides them). Returns logits
        `[batch, q_len, vocab]` (or the normed hidden states with `return_hidden`) and the
        updated cache. Causality and the sliding window are measured in slots, as in
        `__call__`.

        With `packing` (`models.packing`) the chunk is `packing.slot_token`'s `[batch,
        q_len]`, but `input_ids`/`positions` and the result hold only its real tokens,
        packed `[shards, capacity // shards]`: every per-token matmul skips the padding.
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        x = jnp.take(jnp.asarray(self.embed, dtype), input_ids, axis=0)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        shape = input_ids.shape if packing is None else packing.slot_token.shape
        q_len, cache_len = shape[1], kv_mask.shape[1]
        q_slots = jnp.broadcast_to(cache_index + jnp.arange(q_len)[None], shape)
        k_slots = jnp.broadcast_to(jnp.arange(cache_len)[None], kv_mask.shape)
        allowed = attention_allowed(q_slots, k_slots, kv_mask, cfg.sliding_window)
        cos, sin = rope_cos_sin(positions, inverse_frequencies(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        index = StaticSlot(cache_index) if isinstance(cache_index, int) else cache_index
        x, cache = self.layers(x, cos, sin, allowed, index, cache, packing)
        x = rms_norm(x, jnp.asarray(self.final_norm, dtype), cfg.rms_norm_eps)
        return (x if return_hidden else self.logits(x)), cache

    def logits(self, hidden: Array) -> Array:
        """Projects normed hidden states `[..., embed]` to logits `[..., vocab]`."""
        dtype = jnp.dtype(self.config.dtype)
        if self.config.tie_word_embeddings:
            out = project(hidden, jnp.asarray(self.embed, dtype).T)
        else:
            out = project(hidden, jnp.asarray(self.lm_head, dtype))
        names = ("batch", "length", "vocab")[-out.ndim:] if out.ndim <= 3 else None
        return nn.with_logical_constraint(out, names) if names else out

    def target_logits(self, hidden: Array, targets: Array) -> Array:
        """`logits(hidden)` at the `targets` only: hidden `[..., embed]`, targets int `[...]`
        -> float32 `[...]`, from the targets' rows of the output embedding, so picking a
        token's logit costs no pass over the vocabulary (nor, in the backward pass, a
        one-hot of it). Equal to the full projection up to float summation order, and
        rounded through the projection's output dtype as `logits` is."""
        dtype = jnp.dtype(self.config.dtype)
        if self.config.tie_word_embeddings:
            rows = jnp.take(self.embed, targets, axis=0)  # [..., embed]
        else:  # gather the columns, then move embed last: no transpose of the whole head
            rows = jnp.moveaxis(jnp.take(self.lm_head, targets, axis=1), 0, -1)
        rows = rows.astype(dtype).astype(jnp.float32)
        out = jnp.sum(hidden.astype(jnp.float32) * rows, axis=-1)
        return out.astype(jnp.promote_types(hidden.dtype, dtype)).astype(jnp.float32)


def init_cache(config: ModelConfig, batch: int, cache_len: int,
               dtype: str | None = None) -> KVCache:
    """An all-zero KV cache `[layers, batch, cache_len, kv_heads, head_dim]` (`CACHE_AXES`)."""
    shape = (config.num_layers, batch, cache_len, config.num_kv_heads, config.head_dim)
    zeros = jnp.zeros(shape, jnp.dtype(dtype or config.dtype))
    return {"k": zeros, "v": zeros}


def cache_bytes(config: ModelConfig, batch: int, cache_len: int, dtype: str | None = None) -> int:
    """Bytes of a KV cache: batch x length x layers x kv_heads x head_dim x 2 x dtype size."""
    size = jnp.dtype(dtype or config.dtype).itemsize
    return (batch * cache_len * config.num_layers * config.num_kv_heads * config.head_dim
            * 2 * size)


def positions_from_mask(attention_mask: Array) -> Array:
    """Positions `[batch, length]` that count only real tokens (HF's left-padding rule)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
