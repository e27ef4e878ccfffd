"""Response log-probs: one forward pass, the vocabulary projection chunked over length.

`log pi(y|x)` is the SUM of per-token log-probs over the response tokens only (prompt and
padding masked; the end-of-turn token is a response token). The decoder returns normed
hidden states; the projection to the vocabulary and the float32 log-softmax then run one
chunk of `chunk_size` positions at a time inside a `lax.map`, each chunk rematerialised in
the backward pass, so the full `[batch, length, vocab]` float32 log-softmax never exists.
The scored positions of each row are gathered to its front first, so the chunks computed
are those the batch's longest response needs; a chunk with no response token in any row is
skipped.

Layout of a pair batch: `input_ids`, `attention_mask`, `loss_mask`, each int `[pairs, 2,
length]` (index 0 = chosen, 1 = rejected), right-padded. `loss_mask[p, i, t] = 1` when token
`t` is a response token (so it is scored by the logits at position `t - 1`).

The shared-prompt layout (`PairArrays.shared_prompt_dict`) stores each pair's prompt once:
`prompt_ids`, `prompt_mask` int `[pairs, prompt_len]` LEFT-padded and `response_ids`,
`response_mask` int `[pairs, 2, response_len]` right-padded. The prompt then runs through
the decoder once per pair (its keys and values are shared by both responses through the KV
cache, and the gradient flows back through them), not twice: the same log-probs with
`prompt_len / (prompt_len + response_len) / 2` less of the decoder's work.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dice_jax.models.config import ModelConfig
from dice_jax.models.decoder import Decoder, init_cache, positions_from_mask
from dice_jax.models.packing import Packing, pack, unpack

Array = jax.Array
DEFAULT_CHUNK = 128


def vocab_logsumexp(logits: Array, max_parts: int = 16) -> Array:
    """`log sum_v exp(logits[..., v])` float32 `[...]` of `logits [..., vocab]`, as the
    log-sum-exp of the log-sum-exps of `parts` equal vocabulary slices (`parts` the largest
    divisor of the vocabulary size up to `max_parts`): the same value up to float rounding.
    Why: XLA:CPU runs a reduction over one long axis on a single thread, but spreads one
    with an outer axis of slices over its threads; on 2 cores the vocabulary projection
    plus log-sum-exp of SmolLM2 (49,152 columns) takes about a quarter less time."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    parts = max(k for k in range(1, max_parts + 1) if vocab % k == 0)
    if parts == 1:
        return jax.nn.logsumexp(logits, axis=-1)
    sliced = logits.reshape(*logits.shape[:-1], parts, vocab // parts)
    return jax.nn.logsumexp(jax.nn.logsumexp(sliced, axis=-1), axis=-1)


def _chunk_token_logps(params: Any, config: ModelConfig, hidden: Array, targets: Array,
                       mask: Array) -> Array:
    """Log-probs `[batch, chunk]` float32 of `targets` under the logits of `hidden`.

    `hidden [batch, chunk, embed]`, `targets`/`mask` int `[batch, chunk]`. The target logit
    comes from the targets' embedding rows (`Decoder.target_logits`), not from a gather or
    one-hot over the chunk's logits: one pass over the `[batch, chunk, vocab]` logits
    (the log-sum-exp) instead of two, forward and backward. Zero where `mask` is 0.
    """

    def compute(_: None) -> Array:
        model = Decoder(config)
        logits = model.apply({"params": params}, hidden, method=Decoder.logits)
        lse = vocab_logsumexp(logits)
        picked = model.apply({"params": params}, hidden, targets, method=Decoder.target_logits)
        return jnp.where(mask > 0, picked - lse, 0.0)

    def skip(_: None) -> Array:
        return jnp.zeros(targets.shape, jnp.float32)

    return jax.lax.cond(jnp.any(mask > 0), compute, skip, None)


def token_logprobs(params: Any, config: ModelConfig, hidden: Array, targets: Array,
                   mask: Array, chunk_size: int = DEFAULT_CHUNK) -> Array:
    """Per-token log-probs float32 `[batch, length]` from hidden states `[batch, length,
    embed]`; `targets`/`mask` int `[batch, length]` are aligned with `hidden` (position `t`
    scores `targets[:, t]`). Computed `chunk_size` positions at a time, over the masked
    positions only: they are moved to the front of each row first, and chunks where no row
    has one are skipped."""
    b, length, e = hidden.shape
    # Scored positions first (a stable sort keeps their order), so that every chunk past a
    # batch's longest response is skipped whatever the prompt lengths; undone at the end.
    order = jnp.argsort((mask <= 0).astype(jnp.int32), axis=-1, stable=True)
    hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
    targets = jnp.take_along_axis(targets, order, axis=1)
    mask = jnp.take_along_axis(mask, order, axis=1)
    chunk = max(1, min(chunk_size, length))
    n = -(-length // chunk)
    pad = n * chunk - length
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    hs = hidden.reshape(b, n, chunk, e).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
    ms = mask.reshape(b, n, chunk).swapaxes(0, 1)
    body = jax.checkpoint(lambda xs: _chunk_token_logps(params, config, *xs))
    out = jax.lax.map(body, (hs, ts, ms))  # [n, batch, chunk]
    out = out.swapaxes(0, 1).reshape(b, n * chunk)[:, :length]
    return jnp.take_along_axis(out, jnp.argsort(order, axis=-1), axis=1)


def sequence_logprobs(params: Any, config: ModelConfig, input_ids: Array,
                      attention_mask: Array, loss_mask: Array,
                      chunk_size: int = DEFAULT_CHUNK) -> tuple[Array, Array]:
    """Summed response log-probs float32 `[batch]` and response token counts int32 `[batch]`.

    `input_ids`, `attention_mask`, `loss_mask`: int `[batch, length]` (see module doc).
    """
    positions = positions_from_mask(attention_mask)
    hidden = Decoder(config).apply({"params": params}, input_ids, positions, attention_mask,
                                   return_hidden=True)
    # Position t predicts token t + 1: shift the targets left; the last position scores nothing.
    targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    mask = jnp.pad((loss_mask[:, 1:] * attention_mask[:, 1:]), ((0, 0), (0, 1)))
    per_token = token_logprobs(params, config, hidden, targets, mask, chunk_size)
    return jnp.sum(per_token, axis=-1), jnp.sum(mask, axis=-1).astype(jnp.int32)


def prefill_prompts(params: Any, config: ModelConfig, prompt_ids: Array, prompt_mask: Array,
                    packing: Packing | None = None) -> tuple[dict[str, Array], Array]:
    """Prompts `[G, P]` (LEFT-padded) -> their KV cache `{"k", "v"} [layers, G, P, kv_heads,
    head_dim]` (`Decoder.extend` at slots `0..P-1`) and the normed hidden state after each
    prompt's last token `[G, embed]`, which scores the first response token. With
    `packing` (of `prompt_mask`, `models.packing`) the weight matmuls skip the padding."""
    g, p = prompt_ids.shape
    ids, positions = prompt_ids, positions_from_mask(prompt_mask)
    if packing is not None:
        ids, positions = pack(ids, packing), pack(positions, packing)
    hidden, cache = Decoder(config).apply(
        {"params": params}, ids, positions, prompt_mask, init_cache(config, g, p), 0,
        return_hidden=True, packing=packing, method=Decoder.extend)
    if packing is not None:  # only the last column is read: gather it, not the whole batch
        return cache, jnp.take(hidden.reshape(-1, hidden.shape[-1]),
                               packing.slot_token[:, -1], axis=0, mode="fill", fill_value=0)
    return cache, hidden[:, -1]


def response_logprobs(params: Any, config: ModelConfig, prompt_cache: dict[str, Array],
                      last: Array, prompt_mask: Array, response_ids: Array,
                      response_mask: Array, chunk_size: int = DEFAULT_CHUNK,
                      packing: Packing | None = None) -> tuple[Array, Array]:
    """Each row's response against its own prompt's cache: summed log-probs float32
    `[rows]` and scored-token counts int32 `[rows]`.

    `prompt_cache` `[layers, rows, P, kv_heads, head_dim]`, `last [rows, embed]` and
    `prompt_mask [rows, P]` as `prefill_prompts` gives them, taken per row;
    `response_ids`/`response_mask` `[rows, R]` right-padded, at slots `P..P+R-1`. Response
    token `j` is scored by the hidden state before it (`last` for `j = 0`; not scored when
    the prompt is empty, as in the right-padded layout).

    With `packing` (of `response_mask`, `models.packing`), the decoder's weight matmuls and
    the vocabulary projection run on the real response tokens only.
    """
    r = response_ids.shape[1]
    p = prompt_mask.shape[1]
    pad = ((0, 0), (0, 0), (0, r), (0, 0), (0, 0))
    cache = {name: jnp.pad(a, pad) for name, a in prompt_cache.items()}
    prompt_len = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)
    positions = prompt_len[:, None] + jnp.arange(r, dtype=jnp.int32)[None]
    ids = response_ids
    if packing is not None:
        ids, positions = pack(ids, packing), pack(positions, packing)
    hidden, _ = Decoder(config).apply(
        {"params": params}, ids, positions,
        jnp.concatenate([prompt_mask, response_mask], axis=1), cache, p,
        return_hidden=True, packing=packing, method=Decoder.extend)
    first = jnp.arange(r)[None] == 0
    mask = jnp.where(first & (prompt_len[:, None] == 0), 0, response_mask)
    if packing is None:
        scorers = jnp.concatenate([last[:, None].astype(hidden.dtype), hidden[:, :-1]], axis=1)
        per_token = token_logprobs(params, config, scorers, response_ids, mask, chunk_size)
    else:  # a row's tokens are consecutive when packed: the scorer is the packed token
        # before, or the row's `last` for its first token
        flat = hidden.reshape(-1, hidden.shape[-1])
        before = jnp.concatenate([jnp.zeros_like(flat[:1]), flat[:-1]], axis=0)
        slot = packing.token_slot.reshape(-1)
        lasts = jnp.take(last.astype(flat.dtype), slot // r, axis=0, mode="fill", fill_value=0)
        scorers = jnp.where((slot % r == 0)[:, None], lasts, before).reshape(hidden.shape)
        packed = token_logprobs(params, config, scorers, ids, pack(mask, packing),
                                chunk_size)  # ids: the packed response ids
        per_token = unpack(packed, packing)
    return jnp.sum(per_token, axis=-1), jnp.sum(mask, axis=-1, dtype=jnp.int32)


def shared_prompt_logprobs(params: Any, config: ModelConfig, prompt_ids: Array,
                           prompt_mask: Array, response_ids: Array, response_mask: Array,
                           chunk_size: int = DEFAULT_CHUNK) -> tuple[Array, Array]:
    """Summed response log-probs float32 `[pairs, 2]` and scored-token counts int32
    `[pairs, 2]` with each prompt run once (the shared-prompt layout of the module doc):
    the prompts are prefilled (`prefill_prompts`), and each pair's cache is repeated for
    its two responses (`response_logprobs`)."""
    p, lr = prompt_ids.shape[0], response_ids.shape[-1]
    cache, last = prefill_prompts(params, config, prompt_ids, prompt_mask)
    twice = lambda a, axis=0: jnp.repeat(a, 2, axis=axis)  # noqa: E731
    logps, counts = response_logprobs(
        params, config, {name: twice(a, 1) for name, a in cache.items()}, twice(last),
        twice(prompt_mask), response_ids.reshape(2 * p, lr), response_mask.reshape(2 * p, lr),
        chunk_size)
    return logps.reshape(p, 2), counts.reshape(p, 2)


def pair_logprobs(params: Any, config: ModelConfig, batch: dict[str, Array],
                  chunk_size: int = DEFAULT_CHUNK) -> tuple[Array, Array]:
    """Chosen and rejected in ONE forward pass: `(logps [pairs, 2], counts [pairs, 2])`.

    `batch` holds either `input_ids`, `attention_mask`, `loss_mask` int `[pairs, 2,
    length]` (the pair axis and the chosen/rejected axis are merged into one batch axis of
    `2 * pairs`), or the shared-prompt layout (`prompt_ids`, ...; see the module doc).
    """
    if "prompt_ids" in batch:
        return shared_prompt_logprobs(params, config, batch["prompt_ids"], batch["prompt_mask"],
                                      batch["response_ids"], batch["response_mask"],
                                      chunk_size)
    p, two, length = batch["input_ids"].shape
    flat = [batch[k].reshape(p * two, length)
            for k in ("input_ids", "attention_mask", "loss_mask")]
    logps, counts = sequence_logprobs(params, config, *flat, chunk_size=chunk_size)
    return logps.reshape(p, two), counts.reshape(p, two)


@functools.partial(jax.jit, static_argnames=("config", "chunk_size"))
def pair_logprobs_jit(params: Any, batch: dict[str, Array], config: ModelConfig,
                      chunk_size: int = DEFAULT_CHUNK) -> tuple[Array, Array]:
    """`pair_logprobs` jitted (config and chunk size static), for evaluation and caching."""
    return pair_logprobs(params, config, batch, chunk_size)
