"""The jitted programs of the sampler: prefill B prompts once, then decode B*K rows.

`prefill` runs the B left-padded prompts through `Decoder.extend` and returns their KV cache
(one segment per layer) and the logits after each prompt. `decode` samples K continuations
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
from dice_jax.models.decoder import Decoder, init_cache, positions_from_mask
from dice_jax.sampling.distributions import Distribution, next_tokens, token_logprobs
from dice_jax.sharding import DEFAULT_RULES, Rules, logical_to_spec

Array = jax.Array

# Sampling placement: weights are not split over `fsdp` (each step would all-gather them);
# the batch still is, over `data` and `fsdp`. `tensor` splits heads, MLP and vocabulary.
SAMPLING_RULES: Rules = tuple((name, None if name == "embed" else target)
                              for name, target in DEFAULT_RULES)


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


@functools.partial(jax.jit, static_argnames=("program",))
def prefill(params: Any, input_ids: Array, prompt_mask: Array, *, program: Program
            ) -> tuple[list[dict], Array]:
    """Prompts `[B, P]` (left-padded, mask 0/1) -> per-layer prompt KV segments
    `[B, kv_heads, P, head_dim]` and float32 next-token logits `[B, vocab]`."""
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
