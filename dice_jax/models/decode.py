"""One-token decode steps against a KV cache whose prompt part is shared by K samples.

`Decoder.extend` prefills the cache of B prompts once. Decoding then runs N = B*K rows (row
`b*K + k` is sample k of prompt b) against two cache segments per layer:

    prompt    {"k", "v"} [B, kv_heads, prompt_len, head_dim]   read by all K rows of a prompt
    generated chunks of {"k", "v"} [N, kv_heads, chunk, head_dim], one slot written a step

All carry the logical axes `SEGMENT_AXES`. Attention is one float32 softmax over the
prompt and generated slots together, so the result equals attention over the prompt cache
repeated K times, without storing or reading K copies of it. The generated cache is cut
into chunks so that early steps attend only to the chunks reached so far. The layer loop is unrolled
over per-layer buffers rather than scanned over a stacked cache: on CPU, slicing a layer out
of a stacked cache (and stacking it back) copies the whole cache every step, which made a
SmolLM2 step several times slower. The math is that of `dice_jax.models.decoder`; the
parity tests compare the two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dice_jax.models.config import ModelConfig
from dice_jax.models.decoder import _MASKED, rms_norm
from dice_jax.models.rope import apply_rope, inverse_frequencies, rope_cos_sin

Array = jax.Array
Segment = dict  # {"k": Array, "v": Array}, each [rows, kv_heads, length, head_dim]
SEGMENT_AXES = ("batch", "kv_heads", "length", "head_dim")


def split_layers(params: dict, config: ModelConfig) -> list[dict]:
    """Per-layer decode weights from the stacked `params["layers"]`, in the compute dtype.

    One copy, made once per decode call (outside its loop): q/k/v projections fused into
    one `qkv [embed, (heads + 2 kv_heads) * head_dim]` matrix, gate/up into
    `gate_up [embed, 2 mlp]`, `o [heads * head_dim, embed]`, `down [mlp, embed]`, and the two
    norm scales. Fewer, larger matmuls per step.
    """
    dtype = jnp.dtype(config.dtype)
    lay = jax.tree.map(lambda a: jnp.asarray(a, dtype), params["layers"])
    attn, mlp = lay["attn"], lay["mlp"]
    n, e = config.num_layers, config.hidden_size
    qkv = jnp.concatenate([attn[name].reshape(n, e, -1)
                           for name in ("q_proj", "k_proj", "v_proj")], axis=-1)
    gate_up = jnp.concatenate([mlp["gate_proj"], mlp["up_proj"]], axis=-1)
    o = attn["o_proj"].reshape(n, -1, e)
    return [{"qkv": qkv[i], "o": o[i], "gate_up": gate_up[i], "down": mlp["down_proj"][i],
             "attn_norm": lay["attn_norm"][i], "mlp_norm": lay["mlp_norm"][i]}
            for i in range(n)]


def prompt_segments(cache: dict) -> list[Segment]:
    """Per-layer prompt segments `[B, kv_heads, P, head_dim]` from a stacked cache
    `[layers, B, P, kv_heads, head_dim]` (as `Decoder.extend` returns it)."""
    k = jnp.transpose(cache["k"], (0, 1, 3, 2, 4))
    v = jnp.transpose(cache["v"], (0, 1, 3, 2, 4))
    return [{"k": k[i], "v": v[i]} for i in range(k.shape[0])]


def init_generated(config: ModelConfig, rows: int, length: int, chunk: int,
                   dtype: str | None = None) -> list[list[Segment]]:
    """Zeroed generated-token segments: per layer, `ceil(length / chunk)` chunks of
    `[rows, kv_heads, chunk, head_dim]`."""
    shape = (rows, config.num_kv_heads, chunk, config.head_dim)
    dt = jnp.dtype(dtype or config.dtype)
    chunks = -(-length // chunk)
    return [[{"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in range(chunks)]
            for _ in range(config.num_layers)]


def shared_prefix_attention(q: Array, prompt: Segment, chunks: list[Segment],
                            prompt_allowed: Array, chunk_allowed: list[Array]) -> Array:
    """Attention of one new token per row over its prompt's shared cache and its own.

    q `[N, heads, head_dim]` with N = B*K (row b*K + k belongs to prompt b); prompt k/v
    `[B, kv_heads, P, head_dim]`; each generated chunk's k/v `[N, kv_heads, C, head_dim]`;
    prompt_allowed bool `[B, P]`; chunk_allowed bool `[C]` per chunk (the same slots for
    every row). Returns `[N, heads, head_dim]`. One float32 softmax spans all segments
    (normalised after the value products, so no segment is copied or concatenated). As in
    `decoder._attend`, the scores are rounded through the compute dtype and the value
    products accumulate in float32: with bfloat16 compute, rounding each segment's partial
    output to bfloat16 before adding them would lose precision the scorer keeps.
    """
    n, h, d = q.shape
    b, kv = prompt["k"].shape[:2]
    k_rep, g = n // b, h // kv
    dtype, scale = q.dtype, d ** -0.5
    # Prompt segment: the K rows of a prompt form one [K*G, P] score block per kv head.
    qp = q.reshape(b, k_rep, kv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv, k_rep * g, d)
    f32 = jnp.float32
    s_p = jnp.einsum("bhmd,bhsd->bhms", qp, prompt["k"].astype(dtype)).astype(f32)
    s_p = jnp.where(prompt_allowed[:, None, None, :], s_p * scale, _MASKED)
    qn = q.reshape(n, kv, g, d)
    s_c = [jnp.where(allowed, jnp.einsum("nhgd,nhcd->nhgc", qn, c["k"].astype(dtype)
                                         ).astype(f32) * scale, _MASKED)
           for c, allowed in zip(chunks, chunk_allowed)]
    to_rows = lambda x: x.reshape(b, kv, k_rep, g, *x.shape[3:]).swapaxes(1, 2).reshape(  # noqa: E731
        n, kv, g, *x.shape[3:])
    high = to_rows(jnp.max(s_p, axis=-1))
    for s in s_c:
        high = jnp.maximum(high, jnp.max(s, axis=-1))
    high_p = high.reshape(b, k_rep, kv, g).swapaxes(1, 2).reshape(b, kv, k_rep * g)
    e_p = jnp.exp(s_p - high_p[..., None])
    total = to_rows(jnp.sum(e_p, axis=-1))
    out = to_rows(jnp.einsum("bhms,bhsd->bhmd", e_p.astype(dtype), prompt["v"].astype(dtype),
                             preferred_element_type=f32))
    for s, c in zip(s_c, chunks):
        e = jnp.exp(s - high[..., None])
        total = total + jnp.sum(e, axis=-1)
        out = out + jnp.einsum("nhgc,nhcd->nhgd", e.astype(dtype), c["v"].astype(dtype),
                               preferred_element_type=f32)
    return (out / total[..., None]).astype(dtype).reshape(n, h, d)


def _layer_step(config: ModelConfig, lp: dict, x: Array, cos: Array, sin: Array,
                prompt: Segment, chunks: list[Segment], offset: Array, prompt_allowed: Array,
                chunk_allowed: list[Array]) -> tuple[Array, list[Segment]]:
    """One decoder layer for one token per row: x `[N, embed]` -> `[N, embed]`; the new
    key/value go to slot `offset` of the last chunk. `lp` is one entry of `split_layers`."""
    n, h, kv, d = x.shape[0], config.num_heads, config.num_kv_heads, config.head_dim
    qkv = rms_norm(x, lp["attn_norm"], config.rms_norm_eps) @ lp["qkv"]
    q = _rope(qkv[:, :h * d].reshape(n, h, d), cos, sin)
    k = _rope(qkv[:, h * d:(h + kv) * d].reshape(n, kv, d), cos, sin)
    v = qkv[:, (h + kv) * d:].reshape(n, kv, d)
    last = chunks[-1]
    write = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        cache, new[:, :, None].astype(cache.dtype), offset, axis=2)
    chunks = [*chunks[:-1], {"k": write(last["k"], k), "v": write(last["v"], v)}]
    out = shared_prefix_attention(q, prompt, chunks, prompt_allowed, chunk_allowed)
    x = x + out.reshape(n, h * d) @ lp["o"]
    gate_up = rms_norm(x, lp["mlp_norm"], config.rms_norm_eps) @ lp["gate_up"]
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return x + (jax.nn.silu(gate) * up) @ lp["down"], chunks


def _rope(x: Array, cos: Array, sin: Array) -> Array:
    """`apply_rope` for one token per row: x `[N, heads, head_dim]`, cos/sin `[N, head_dim]`."""
    return apply_rope(x[:, None], cos[:, None], sin[:, None])[:, 0]


def step_inputs(config: ModelConfig, params: dict, tokens: Array, positions: Array
                ) -> tuple[Array, Array, Array]:
    """One token per row: embeddings `[n, embed]` of `tokens [n]` and the RoPE cos/sin
    `[n, head_dim/2]` of `positions [n]`, in the compute dtype."""
    dtype = jnp.dtype(config.dtype)
    x = jnp.take(jnp.asarray(params["embed"], dtype), tokens, axis=0)
    cos, sin = rope_cos_sin(positions[:, None], inverse_frequencies(
        config.head_dim, config.rope_theta, config.rope_scaling))
    return x, cos[:, 0], sin[:, 0]


def step_logits(config: ModelConfig, params: dict, x: Array) -> Array:
    """Final norm and LM head of one token per row: x `[n, embed]` -> float32 `[n, vocab]`.
    Rounded through the compute dtype as `Decoder.logits` is (so a sampled token's log-prob
    is the one the scorer gives it), then float32 for the log-softmax."""
    dtype = jnp.dtype(config.dtype)
    x = rms_norm(x, jnp.asarray(params["final_norm"], dtype), config.rms_norm_eps)
    if config.tie_word_embeddings:
        logits = jnp.einsum("ne,ve->nv", x, jnp.asarray(params["embed"], dtype))
    else:
        logits = jnp.einsum("ne,ev->nv", x, jnp.asarray(params["lm_head"], dtype))
    return logits.astype(jnp.float32)



def decode_step(config: ModelConfig, params: dict, layers: list[dict], tokens: Array,
                positions: Array, slot: Array, prompt: list[Segment], prompt_mask: Array,
                generated: list[list[Segment]]) -> tuple[Array, list[list[Segment]]]:
    """Feeds one token per row and returns float32 next-token logits `[N, vocab]`.

    tokens/positions `[N]` int (positions count real tokens, as in `positions_from_mask`).
    `generated[layer]` lists the chunks attended to, all of length C; the token is written
    to generated slot `slot` (int32 scalar, the same for all rows), which must lie in the
    last chunk: slots `(len - 1) * C ..`. `params` supplies the embeddings and final norm;
    `layers` is `split_layers(...)`. prompt_mask `[B, P]` 0/1 marks real prompt slots.
    The sliding window, if any, is measured in slots: prompt slot s is P + slot - s away.
    """
    p_len = prompt_mask.shape[1]
    chunk = generated[0][0]["k"].shape[2]
    prompt_allowed = prompt_mask.astype(bool)
    chunk_slots = [c * chunk + jnp.arange(chunk) for c in range(len(generated[0]))]
    chunk_allowed = [slots <= slot for slots in chunk_slots]
    if config.sliding_window is not None:
        w = config.sliding_window
        prompt_allowed &= (p_len + slot - jnp.arange(p_len))[None, :] < w
        chunk_allowed = [a & ((slot - slots) < w) for a, slots in zip(chunk_allowed, chunk_slots)]
    offset = slot - (len(generated[0]) - 1) * chunk
    x, cos, sin = step_inputs(config, params, tokens, positions)
    new_generated = []
    for lp, pseg, chunks in zip(layers, prompt, generated):
        x, chunks = _layer_step(config, lp, x, cos, sin, pseg, chunks, offset, prompt_allowed,
                                chunk_allowed)
        new_generated.append(chunks)
    return step_logits(config, params, x), new_generated
