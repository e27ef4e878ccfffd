"""The jitted programs of the sampler: prefill B prompts once, then decode B*K rows.

`prefill` runs the B left-padded prompts through `Decoder.extend` and returns their KV cache
(one segment per layer) and the logits after each prompt; `prefill_part` does the same for
some rows of a larger batch, written into its donated buffers (`empty_prompt`), so that a
batch whose prefill would not fit the memory budget at once runs as several prefill calls
(`prefill_bytes`, `prefill_fit`). `decode` samples K continuations
per prompt in one device-side `lax.while_loop` that stops as soon as every row has emitted
a stop token, or after `max_new_tokens`; the generated-token cache is donated (updated in
place) and returned for reuse by the next batch of the same shape. Nothing leaves the device
until a batch is finished. Params are jit arguments, never constants.

Row `b*K + k` is sample k of prompt b. Its randomness comes only from
`fold_in(fold_in(fold_in(key(seed), prompt_index), k), step)`, so a sample does not depend
on the batch it ran in nor on the device count.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from dice_jax.models.config import ModelConfig
from dice_jax.models.decode import SEGMENT_AXES, decode_step, prompt_segments, split_layers
from dice_jax.models.decoder import (
    Decoder,
    cache_bytes,
    init_cache,
    positions_from_mask,
    query_blocks,
)
from dice_jax.sampling.distributions import Distribution, next_tokens, token_logprobs
from dice_jax.sharding import DEFAULT_RULES, Rules, logical_to_spec

Array = jax.Array

# Sampling placement: weights are not split over `fsdp` (each step would all-gather them);
# the batch still is, over `data` and `fsdp`. `tensor` splits heads, MLP and vocabulary.
SAMPLING_RULES: Rules = tuple((name, None if name == "embed" else target)
                              for name, target in DEFAULT_RULES)
# One prefill call's transient activations may take this share of `cache_budget_gb` on top
# of the KV cache the budget sizes (so a run holds about 1.5x the budget besides weights).
PREFILL_SHARE = 0.5
# Score-sized float32 buffers XLA keeps live at once in a layer's causal attention: the
# scores and softmax weights of several query blocks (XLA:CPU memory_analysis: 5.6-6.4 of
# the widest block's size from 512 to 4096 tokens; tests/test_prefill_memory.py).
SCORE_COPIES = 6


@dataclasses.dataclass(frozen=True)
class Program:
    """Everything static about a compiled prefill/decode pair (hashable, a jit key)."""

    config: ModelConfig
    dist: Distribution
    num_samples: int
    max_new_tokens: int
    stop_ids: tuple[int, ...]
    pad_id: int = 0
    chunk: int = 32
    cache_dtype: str | None = None
    mesh: Mesh | None = None
    rules: Rules = SAMPLING_RULES


def chunk_size(max_new_tokens: int) -> int:
    """Generated-cache chunk length: at most 4 decode phases, chunks of at least 32."""
    return max(32, -(-max_new_tokens // 4))


def constrain(x: Array, names: tuple[str | None, ...], program: Program) -> Array:
    """Pins `x` to the sharding its logical axis names map to (no-op without a mesh)."""
    if program.mesh is None:
        return x
    spec = logical_to_spec(names, x.shape, program.mesh, program.rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(program.mesh, spec))


def prefill_bytes(config: ModelConfig, length: int, cache_dtype: str | None = None) -> int:
    """Transient bytes one prompt of padded length P = `length` adds to a prefill call
    (`prefill`, `prefill_part`, `slots.prefill`), beyond its outputs.

    The peak is inside one layer's causal attention (`decoder.grouped_attention`): float32
    scores `[heads, query_block, P]` of the widest query block (`query_blocks(P)` queries,
    all P keys), `SCORE_COPIES` of them live at once, or, where larger, the MLP's gate, up
    and product `[P, mlp]` (float32 bytes; bfloat16 compute measures the same on CPU). On
    top, alive through the whole call: the attention mask `[P, P]` bool, the stacked KV
    cache `Decoder.extend` fills (`cache_bytes(config, 1, P)`), and four copies of the
    per-token activations `[P, embed + (heads + 2 kv_heads) * head_dim]` float32 (hidden
    state, q/k/v, their RoPE). Against XLA's temp_size_in_bytes on CPU, each added prompt
    adds 1/1.8 to 1/1.1 of this from 512 tokens up (less below: one query block there);
    left out is a per-call constant: per-layer weight slices, and with bfloat16 compute on
    CPU a float32 copy of the weights (tests/test_prefill_memory.py).
    """
    e, m, h, kv, d = (config.hidden_size, config.intermediate_size, config.num_heads,
                      config.num_kv_heads, config.head_dim)
    p = int(length)
    scores = h * min(p, query_blocks(p)) * p * 4
    mlp = 3 * p * m * 4
    tokens = 4 * p * (e + (h + 2 * kv) * d) * 4
    return (max(SCORE_COPIES * scores, mlp) + p * p + cache_bytes(config, 1, p, cache_dtype)
            + tokens)


def prefill_fit(config: ModelConfig, length: int, budget_bytes: int,
                cache_dtype: str | None = None) -> int:
    """Prompts of padded length `length` whose prefill activations (`prefill_bytes` each)
    fit `PREFILL_SHARE` of `budget_bytes`; at least 1 (one prompt runs whatever it needs)."""
    return max(1, int(PREFILL_SHARE * budget_bytes) // prefill_bytes(config, length,
                                                                      cache_dtype))


def _prefill(params: Any, input_ids: Array, prompt_mask: Array, program: Program
             ) -> tuple[list[dict], Array]:
    cfg = program.config
    batch, length = input_ids.shape
    cache = init_cache(cfg, batch, length, program.cache_dtype)
    hidden, cache = Decoder(cfg).apply(
        {"params": params}, input_ids, positions_from_mask(prompt_mask), prompt_mask, cache,
        0, return_hidden=True, method=Decoder.extend)
    logits = Decoder(cfg).apply({"params": params}, hidden[:, -1], method=Decoder.logits)
    segments = [{name: constrain(a, SEGMENT_AXES, program) for name, a in seg.items()}
                for seg in prompt_segments(cache)]
    return segments, constrain(logits.astype(jnp.float32), ("batch", "vocab"), program)


@functools.partial(jax.jit, static_argnames=("program",))
def prefill(params: Any, input_ids: Array, prompt_mask: Array, *, program: Program
            ) -> tuple[list[dict], Array]:
    """Prompts `[B, P]` (left-padded, mask 0/1) -> per-layer prompt KV segments
    `[B, kv_heads, P, head_dim]` and float32 next-token logits `[B, vocab]`."""
    return _prefill(params, input_ids, prompt_mask, program)


@functools.partial(jax.jit, static_argnames=("program", "batch", "length"))
def empty_prompt(*, program: Program, batch: int, length: int) -> tuple[list[dict], Array]:
    """Zeroed `prefill` outputs for `batch` prompts of `length`, for `prefill_part` to fill."""
    cfg = program.config
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    dtype = jnp.dtype(program.cache_dtype or cfg.dtype)
    segments = [{name: constrain(jnp.zeros(shape, dtype), SEGMENT_AXES, program)
                 for name in ("k", "v")} for _ in range(cfg.num_layers)]
    logits = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
    return segments, constrain(logits, ("batch", "vocab"), program)


@functools.partial(jax.jit, static_argnames=("program", "shards"),
                   donate_argnames=("segments", "logits"))
def prefill_part(params: Any, segments: list[dict], logits: Array, input_ids: Array,
                 prompt_mask: Array, start: Array, *, program: Program, shards: int
                 ) -> tuple[list[dict], Array]:
    """`prefill` of n of a batch's B prompts, written into the batch's donated outputs
    (`empty_prompt`, or the previous part's).

    The B rows are `shards` blocks of B/shards (one per data shard when the batch is split
    over the mesh, else one); `input_ids`/`prompt_mask` `[n, P]` are rows `start ..
    start + n/shards - 1` (`start` int32) of each block, block by block, so each shard
    writes only its own rows.
    """
    part, part_logits = _prefill(params, input_ids, prompt_mask, program)

    def put(full: Array, new: Array, names: tuple[str, ...]) -> Array:
        blocks = full.reshape(shards, -1, *full.shape[1:])
        new = new.reshape(shards, -1, *new.shape[1:]).astype(full.dtype)
        blocks = jax.lax.dynamic_update_slice_in_dim(blocks, new, start, axis=1)
        return constrain(blocks.reshape(full.shape), names, program)

    segments = [{name: put(seg[name], new[name], SEGMENT_AXES) for name in ("k", "v")}
                for seg, new in zip(segments, part)]
    return segments, put(logits, part_logits, ("batch", "vocab"))


def row_keys(seed: Array, prompt_index: Array, sample_index: Array) -> Array:
    """Per-row PRNG keys `[rows]` from a seed and the rows' prompt and sample indices."""
    base = jax.random.key(seed)
    return jax.vmap(lambda p, k: jax.random.fold_in(jax.random.fold_in(base, p), k))(
        prompt_index, sample_index)


@functools.partial(jax.jit, static_argnames=("program",), donate_argnames=("generated",))
def decode(params: Any, prompt: list[dict], prompt_mask: Array, first_logits: Array,
           prompt_index: Array, seed: Array, generated: list[list[dict]], limit: Array, *,
           program: Program) -> tuple[dict[str, Array], list[list[dict]]]:
    """Samples `max_new_tokens` (or until every row stopped) for B*K rows.

    prompt: `prefill`'s segments; prompt_mask `[B, P]`; first_logits `[B, vocab]`;
    prompt_index `[B]` int32, the prompts' indices in the caller's list (for the keys);
    seed: uint32 scalar; generated: per layer, chunks `[B*K, kv_heads, chunk, head_dim]`
    covering `max_new_tokens` slots (`init_generated`; donated, old contents never read);
    limit: int32 scalar, generate at most this many tokens (<= max_new_tokens; 1 runs just
    the first sampling step, e.g. to compile). Returns `tokens [B*K, max_new]` int32 (pad
    after a stop), `logprobs [B*K, max_new]` float32 (untempered policy log-probs, 0 after
    a stop), `lengths [B*K]` (stop token included), `stopped [B*K]` bool, `steps` (forward
    passes run), and the generated chunks for reuse.
    """
    cfg, k_rep, m = program.config, program.num_samples, program.max_new_tokens
    batch = prompt_mask.shape[0]
    rows = batch * k_rep
    layers = split_layers(params, cfg)
    keys = row_keys(seed, jnp.repeat(prompt_index, k_rep),
                    jnp.tile(jnp.arange(k_rep, dtype=jnp.int32), batch))
    prompt_len = jnp.repeat(jnp.sum(prompt_mask.astype(jnp.int32), axis=-1), k_rep)
    stop_ids = jnp.asarray(program.stop_ids, jnp.int32)
    row_names = ("batch",)

    def sample(logits: Array, step: Array, done: Array) -> tuple[Array, Array, Array]:
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        token = next_tokens(logits, step_keys, program.dist)
        logprob = token_logprobs(logits, token)
        token = jnp.where(done, program.pad_id, token)
        return (constrain(token, row_names, program),
                jnp.where(done, 0.0, logprob), done | jnp.isin(token, stop_ids) & ~done)

    logits = constrain(jnp.repeat(first_logits, k_rep, axis=0), ("batch", "vocab"), program)
    token, logprob, stopped = sample(logits, jnp.int32(0), jnp.zeros((rows,), bool))
    tokens = jnp.zeros((rows, m), jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((rows, m), jnp.float32).at[:, 0].set(logprob)
    state = (jnp.int32(1), token, stopped, jnp.ones((rows,), jnp.int32), tokens, logprobs)

    def body(state: tuple, chunks: list[list[dict]]) -> tuple[tuple, list[list[dict]]]:
        step, token, stopped, lengths, tokens, logprobs = state
        logits, chunks = decode_step(cfg, params, layers, token, prompt_len + step - 1,
                                     step - 1, prompt, prompt_mask, chunks)
        chunks = [[{n: constrain(a, SEGMENT_AXES, program) for n, a in c.items()}
                   for c in layer] for layer in chunks]
        token, logprob, new_stopped = sample(logits, step, stopped)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, step, axis=1)
        logprobs = jax.lax.dynamic_update_index_in_dim(logprobs, logprob, step, axis=1)
        lengths = lengths + (~stopped).astype(jnp.int32)
        return (step + 1, token, new_stopped, lengths, tokens, logprobs), chunks

    # Phase c feeds the tokens of generated slots [c*chunk, (c+1)*chunk) and attends to
    # chunks 0..c only; each phase is its own while loop, left as soon as all rows stopped.
    generated = [list(layer) for layer in generated]
    for c in range(len(generated[0])):
        end = jnp.minimum(min(m, (c + 1) * program.chunk + 1), limit)

        def running(carry: tuple, end: Array = end) -> Array:
            (step, _, stopped, *_), _ = carry
            return (step < end) & ~jnp.all(stopped)

        active = [layer[:c + 1] for layer in generated]
        state, active = jax.lax.while_loop(running, lambda carry: body(*carry),
                                           (state, active))
        generated = [layer_active + layer[c + 1:]
                     for layer_active, layer in zip(active, generated)]
    steps, _, stopped, lengths, tokens, logprobs = state
    out = {"tokens": tokens, "logprobs": logprobs, "lengths": lengths, "stopped": stopped,
           "steps": steps - 1}
    return out, generated
