"""The user-facing sampler: K responses per prompt with their policy log-probs.

`Sampler.sample(prompts)` tokenises (chat template, generation prompt), checks lengths and
runs one of two engines with a progress bar: continuous batching (`engine.SlotEngine`:
decode slots refilled as rows finish) or static batches (prompts grouped by power-of-two
length bucket, batches that fit the KV-cache budget, `generate.prefill` / `decode` per
batch, each until its longest row stops). Both engines also cap the prompts of one prefill
call so that its activations fit `generate.PREFILL_SHARE` of the budget (a static batch
with more prompts is prefilled in parts, `generate.prefill_part`). The math is in
`generate`, `slots` and `distributions`.
"""

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from dice_jax.distributed import host_tree, put_global
from dice_jax.models.config import ModelConfig
from dice_jax.models.decode import init_generated
from dice_jax.models.decoder import cache_bytes
from dice_jax.progress import bar_disabled
from dice_jax.sampling.config import SamplingConfig
from dice_jax.sampling.engine import EngineStats, Finished, SlotEngine
from dice_jax.sampling.generate import (
    SAMPLING_RULES,
    Program,
    chunk_size,
    decode,
    empty_prompt,
    prefill,
    prefill_fit,
    prefill_part,
)
from dice_jax.sampling.plan import CHUNK_STEPS, next_power_of_two, plan_slots
from dice_jax.sampling.results import Sample, SamplingResult, make_sample
from dice_jax.sampling.slots import SlotProgram
from dice_jax.sharding import logical_to_spec, param_shardings

log = logging.getLogger("dice_jax.sampling")
STATIC_MAX_NEW_TOKENS = 256  # "auto" runs static batches up to this many new tokens
ENGINES = ("auto", "continuous", "static")
Prompt = str | Sequence[dict] | Sequence[int]


class Batch(NamedTuple):
    """One static batch: `size` prompt rows (padding included) of length `bucket` holding
    the prompts `indices`, prefilled `prefill_rows` rows per call (`size`: one call)."""

    size: int
    bucket: int
    indices: list[int]
    prefill_rows: int


def sampling_param_shardings(config: ModelConfig, mesh: Mesh) -> Any:
    """The sampling placement of params: `param_shardings` without the fsdp split."""
    return param_shardings(config, mesh, SAMPLING_RULES)


class Sampler:
    """Samples K responses per prompt from a policy.

    `params`/`config` as from `dice_jax.checkpoints.load_model`; `tokenizer` a transformers
    tokenizer (None: prompts must be token-id lists and `text` is empty). With `mesh`, the
    params are placed per `sampling_param_shardings` and batches split over `data`/`fsdp`.
    """

    def __init__(self, params: Any, config: ModelConfig, tokenizer: Any = None,
                 mesh: Mesh | None = None) -> None:
        self.config, self.tokenizer, self.mesh = config, tokenizer, mesh
        self.params = params if mesh is None else jax.device_put(
            params, sampling_param_shardings(config, mesh))
        # Generated-token caches donated by one batch and reused by the next of the same
        # shape within a `sample` call (emptied when the call ends).
        self._generated: dict[tuple, list[list[dict]]] = {}

    # ------------------------------------------------------------------ tokenising
    def encode(self, prompt: Prompt, index: int) -> list[int]:
        """Token ids of one prompt: a string (one user turn), chat messages, or ids as is."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError(f"prompt {index} is empty")
            messages: Any = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, (list, tuple, np.ndarray)) and all(
                isinstance(t, (int, np.integer)) for t in prompt):
            if len(prompt) == 0:
                raise ValueError(f"prompt {index} is empty")
            return [int(t) for t in prompt]
        else:
            messages = list(prompt)
            if not messages:
                raise ValueError(f"prompt {index} is empty (no messages)")
        tok = self.tokenizer
        if tok is None:
            raise ValueError(f"prompt {index} is text but the sampler has no tokenizer")
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
        elif isinstance(prompt, str):
            ids = list(tok(prompt)["input_ids"])
        else:
            raise ValueError(f"prompt {index} is chat messages but the tokenizer has no "
                             "chat template")
        bos = tok.bos_token_id
        if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
            ids = ids[1:]  # never a second BOS
        if not ids:
            raise ValueError(f"prompt {index} is empty after tokenisation")
        return ids

    def stop_ids(self, sampling: SamplingConfig) -> tuple[int, ...]:
        if sampling.stop_token_ids is not None:
            ids = set(sampling.stop_token_ids)
        else:
            ids = set(self.config.eos_token_ids)
            eos = getattr(self.tokenizer, "eos_token_id", None)
            if eos is not None:
                ids.add(int(eos))
        if not ids:
            raise ValueError("no stop token ids: set SamplingConfig.stop_token_ids")
        return tuple(sorted(ids))

    def prepare(self, prompts: Sequence[Prompt], sampling: SamplingConfig
                ) -> tuple[list[list[int]], int]:
        """Token ids per prompt, checked against `max_prompt_tokens`; returns the number
        truncated too."""
        limit = sampling.max_prompt_tokens
        out, truncated = [], []
        for i, prompt in enumerate(prompts):
            ids = self.encode(prompt, i)
            if len(ids) > limit:
                if not sampling.truncate_prompts:
                    raise ValueError(f"prompt {i} has {len(ids)} tokens, more than "
                                     f"max_prompt_tokens={limit} (or set truncate_prompts)")
                ids = ids[-limit:]
                truncated.append(i)
            out.append(ids)
        if truncated:
            log.warning("left-truncated %d prompt(s) to %d tokens: indices %s",
                        len(truncated), limit, truncated[:20])
        return out, len(truncated)

    # ------------------------------------------------------------------ batching
    def batch_prompts(self, bucket: int, sampling: SamplingConfig) -> int:
        """How many prompts of padded length `bucket` fit one batch under the budget."""
        chunk = chunk_size(sampling.max_new_tokens)
        generated = -(-sampling.max_new_tokens // chunk) * chunk
        per_prompt = (cache_bytes(self.config, 1, bucket, sampling.cache_dtype)
                      + cache_bytes(self.config, sampling.num_samples, generated,
                                    sampling.cache_dtype))
        fit = sampling.cache_budget_bytes // per_prompt
        if fit < 1:
            raise ValueError(f"cache_budget_gb={sampling.cache_budget_gb} "
                             f"({sampling.cache_budget_bytes} bytes) is below one "
                             f"prompt's KV cache ({per_prompt} bytes at prompt length "
                             f"{bucket}, {sampling.num_samples} samples, "
                             f"{sampling.max_new_tokens} new tokens)")
        if sampling.max_batch_prompts:
            fit = min(fit, sampling.max_batch_prompts)
        return int(fit)

    def prefill_rows(self, size: int, bucket: int, sampling: SamplingConfig) -> int:
        """Rows of a `size`-row batch at `bucket` one prefill call runs: as many prompts as
        `generate.prefill_fit` allows, counting each device's copy when the rows are not
        split over the data shards (a size that is not a multiple of them). At least one
        row per data shard, or one row."""
        dp = self._data_parallel()
        fit = prefill_fit(self.config, bucket, sampling.cache_budget_bytes,
                          sampling.cache_dtype)
        rows = max(dp, fit // dp * dp) if size % dp == 0 else max(1, fit // dp)
        return min(size, rows)

    def plan(self, lengths: Sequence[int], sampling: SamplingConfig) -> list[Batch]:
        """The static batches (`Batch`); the batch size is a power of two (then a multiple
        of the data-parallel size) so few programs compile."""
        buckets: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            buckets.setdefault(max(sampling.min_bucket, next_power_of_two(n)), []).append(i)
        dp = self._data_parallel()
        step = dp // math.gcd(dp, sampling.num_samples)
        batches = []
        for bucket in sorted(buckets):
            members = buckets[bucket]
            fit = self.batch_prompts(bucket, sampling)
            fit = fit // step * step if fit >= step else fit
            for start in range(0, len(members), fit):
                chunk = members[start:start + fit]
                size = min(next_power_of_two(len(chunk)), max(fit, len(chunk)))
                size = -(-size // step) * step
                batches.append(Batch(size, bucket, chunk,
                                     self.prefill_rows(size, bucket, sampling)))
        return batches

    def _data_parallel(self) -> int:
        """Data shards a batch is split over (`data` x `fsdp`)."""
        return 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    # ------------------------------------------------------------------ running
    def _put(self, x: np.ndarray, names: tuple[str, ...]) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        spec = logical_to_spec(names, x.shape, self.mesh, SAMPLING_RULES)
        return put_global(x, NamedSharding(self.mesh, spec))

    def _generated_cache(self, program: Program, rows: int) -> list[dict]:
        key = (program, rows)
        cache = self._generated.pop(key, None)
        if cache is None:
            cache = init_generated(self.config, rows, program.max_new_tokens, program.chunk,
                                   program.cache_dtype)
            if self.mesh is not None:
                cache = [[{n: self._put_array(a) for n, a in c.items()} for c in layer]
                         for layer in cache]
        return cache

    def _put_array(self, a: jax.Array) -> jax.Array:
        spec = logical_to_spec(("batch", "kv_heads", "length", "head_dim"), a.shape, self.mesh,
                               SAMPLING_RULES)
        return jax.device_put(a, NamedSharding(self.mesh, spec))

    def run_batch(self, token_ids: list[list[int]], indices: list[int], size: int,
                  bucket: int, program: Program, seed: int, limit: int | None = None,
                  prefill_rows: int | None = None) -> dict[str, np.ndarray]:
        """Prefill + decode one batch; rows past `len(indices)` prompts are padding.
        `limit` caps the new tokens (default `max_new_tokens`); `prefill_rows` the rows of
        one prefill call (default all)."""
        ids = np.full((size, bucket), program.pad_id, np.int32)
        mask = np.zeros((size, bucket), np.int32)
        for row in range(size):
            seq = token_ids[indices[min(row, len(indices) - 1)]]
            ids[row, bucket - len(seq):] = seq
            mask[row, bucket - len(seq):] = 1
        prompt_index = np.asarray(indices + [-1] * (size - len(indices)), np.int32)
        mask_d = self._put(mask, ("batch", "length"))
        if prefill_rows is None or prefill_rows >= size:
            segments, logits = prefill(self.params, self._put(ids, ("batch", "length")), mask_d,
                                       program=program)
        else:
            segments, logits = self._prefill_parts(ids, mask, prefill_rows, program)
        rows = size * program.num_samples
        out, generated = decode(self.params, segments, mask_d, logits,
                                self._put(prompt_index, ("batch",)),
                                jnp.asarray(seed & 0xFFFFFFFF, jnp.uint32),
                                self._generated_cache(program, rows),
                                jnp.int32(limit or program.max_new_tokens), program=program)
        result = host_tree(out)  # the one host transfer of the batch (all processes')
        self._generated[(program, rows)] = generated
        return result

    def _prefill_parts(self, ids: np.ndarray, mask: np.ndarray, rows: int, program: Program
                       ) -> tuple[list[dict], jax.Array]:
        """`prefill` of a batch in calls of `rows` rows (`generate.prefill_part`): with the
        batch split over the data shards, each call takes the same rows of every shard's
        block; the last call ends at the blocks' end (re-running a few rows of the one
        before when `rows` does not divide them: the same prompts, the same cache)."""
        size, bucket = ids.shape
        dp = self._data_parallel()
        shards = dp if size % dp == 0 and rows % dp == 0 else 1
        block, per_call = size // shards, rows // shards
        segments, logits = empty_prompt(program=program, batch=size, length=bucket)
        for first in range(0, block, per_call):
            start = min(first, block - per_call)
            take = [s * block + start + i for s in range(shards) for i in range(per_call)]
            segments, logits = prefill_part(
                self.params, segments, logits, self._put(ids[take], ("batch", "length")),
                self._put(mask[take], ("batch", "length")), jnp.int32(start),
                program=program, shards=shards)
        return segments, logits

    def program(self, sampling: SamplingConfig) -> Program:
        """The static description of the jitted programs a run with `sampling` uses."""
        return Program(self.config, sampling.distribution, sampling.num_samples,
                       sampling.max_new_tokens, self.stop_ids(sampling), pad_id=self._pad_id(),
                       chunk=chunk_size(sampling.max_new_tokens),
                       cache_dtype=sampling.cache_dtype, mesh=self.mesh)

    def compile(self, prompts: Sequence[Prompt], sampling: SamplingConfig | None = None,
                engine: str = "auto") -> float:
        """Compiles every program `sample(prompts, sampling, engine)` will run (running each
        once on throwaway inputs); returns the seconds it took."""
        sampling = sampling or SamplingConfig()
        start = time.perf_counter()
        token_ids, _ = self.prepare(prompts, sampling)
        if self.engine(engine, sampling, token_ids) == "continuous":
            self.slot_engine(token_ids, sampling).compile(token_ids)
            return time.perf_counter() - start
        program = self.program(sampling)
        done: set[tuple[int, int, int]] = set()
        try:
            for size, bucket, indices, rows in self.plan([len(t) for t in token_ids], sampling):
                if (size, bucket, rows) not in done:
                    done.add((size, bucket, rows))
                    self.run_batch(token_ids, indices, size, bucket, program, 0, limit=1,
                                   prefill_rows=rows)
        finally:
            self._generated.clear()
        return time.perf_counter() - start

    # ------------------------------------------------------------------ continuous
    def engine(self, engine: str, sampling: SamplingConfig, token_ids: list[list[int]]
               ) -> str:
        """The engine a call runs: "continuous" (decode slots refilled as rows finish) or
        "static" (each batch decodes until its longest row stops). "auto" is static when
        every (prompt, sample) gets a decode slot at once, or when no row may run longer
        than `STATIC_MAX_NEW_TOKENS`; else continuous. Static batches share each prompt's
        cache among its K samples and skip the slot bookkeeping and the grouped-attention
        programs (longer to compile); a short limit bounds what a batch wastes on rows
        that stopped early. Past the limit a long tail of lengths makes refilling win
        (BENCHMARKS.md, "Sampler": the engines at 128, 256 and 1024 new tokens)."""
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r}: expected one of {', '.join(ENGINES)}")
        if engine != "auto":
            return engine
        if sampling.max_new_tokens <= STATIC_MAX_NEW_TOKENS:
            return "static"
        plan = self.slot_engine(token_ids, sampling).plan
        return "static" if len(token_ids) * sampling.num_samples <= plan.slots else "continuous"

    def slot_engine(self, token_ids: list[list[int]], sampling: SamplingConfig) -> SlotEngine:
        """The continuous-batching engine for these prompts, sized from the cache budget."""
        dp = self._data_parallel()
        plan = plan_slots(self.config, [len(t) for t in token_ids], sampling.num_samples,
                          sampling.max_new_tokens, sampling.cache_budget_bytes,
                          sampling.cache_dtype, sampling.min_bucket, dp, sampling.max_slots,
                          sampling.tiered_slots)
        program = SlotProgram(self.config, sampling.distribution, sampling.max_new_tokens,
                              self.stop_ids(sampling), plan.capacity, plan.max_prompt,
                              plan.staging_rows, min(CHUNK_STEPS, sampling.max_new_tokens),
                              tiers=plan.tiers, pad_id=self._pad_id(),
                              cache_dtype=sampling.cache_dtype, mesh=self.mesh)
        return SlotEngine(self.params, program, plan, self._put)

    def _sample_slots(self, token_ids: list[list[int]], num_truncated: int,
                      sampling: SamplingConfig, start: float) -> SamplingResult:
        k = sampling.num_samples
        samples: list[list[Sample | None]] = [[None] * k for _ in token_ids]
        engine = self.slot_engine(token_ids, sampling)
        with tqdm(total=len(token_ids) * k, unit="sample", desc="sampling",
                  disable=bar_disabled(sampling.progress), dynamic_ncols=True) as bar:

            def finished(row: Finished, stats: EngineStats) -> None:
                samples[row.prompt_index][row.sample_index] = make_sample(
                    self.tokenizer, row.prompt_index, row.sample_index, row.tokens,
                    row.logprobs, row.stopped)
                bar.update(1)
                elapsed = time.perf_counter() - start
                bar.set_postfix(tok_s=f"{stats.generated_tokens / elapsed:.0f}",
                                util=f"{stats.generated_tokens / max(1, stats.slot_steps):.0%}")

            stats = engine.run(token_ids, k, sampling.seed, finished)
        return SamplingResult(
            samples=samples, prompt_token_ids=token_ids,  # type: ignore[arg-type]
            num_truncated=num_truncated, num_generated_tokens=stats.generated_tokens,
            seconds=time.perf_counter() - start, num_batches=stats.device_calls,
            decode_steps=stats.decode_steps, shapes=[], engine="continuous",
            slot_steps=stats.slot_steps)

    # ------------------------------------------------------------------ static
    def sample(self, prompts: Sequence[Prompt], sampling: SamplingConfig | None = None,
               engine: str = "auto") -> SamplingResult:
        """K = `sampling.num_samples` responses for each prompt, in prompt order. `engine`:
        "auto", "continuous" or "static" (see `Sampler.engine`)."""
        sampling = sampling or SamplingConfig()
        start = time.perf_counter()
        token_ids, num_truncated = self.prepare(prompts, sampling)
        if self.engine(engine, sampling, token_ids) == "continuous":
            return self._sample_slots(token_ids, num_truncated, sampling, start)
        program = self.program(sampling)
        batches = self.plan([len(t) for t in token_ids], sampling)
        k = sampling.num_samples
        samples: list[list[Sample | None]] = [[None] * k for _ in token_ids]
        generated = steps = 0
        try:
            with tqdm(total=len(token_ids) * k, unit="sample", desc="sampling",
                      disable=bar_disabled(sampling.progress), dynamic_ncols=True) as bar:
                for size, bucket, indices, rows in batches:
                    out = self.run_batch(token_ids, indices, size, bucket, program,
                                         sampling.seed, prefill_rows=rows)
                    generated += self._collect(out, indices, k, samples)
                    steps += int(out["steps"])
                    elapsed = time.perf_counter() - start
                    bar.update(len(indices) * k)
                    bar.set_postfix(tok_s=f"{generated / elapsed:.0f}", bucket=bucket)
        finally:
            self._generated.clear()
        return SamplingResult(
            samples=samples, prompt_token_ids=token_ids,  # type: ignore[arg-type]
            num_truncated=num_truncated, num_generated_tokens=generated,
            seconds=time.perf_counter() - start, num_batches=len(batches), decode_steps=steps,
            shapes=sorted({(b.size, b.bucket) for b in batches}))

    def _collect(self, out: dict[str, np.ndarray], indices: list[int], k: int,
                 samples: list[list[Sample | None]]) -> int:
        total = 0
        for b, prompt_index in enumerate(indices):
            for j in range(k):
                n = int(out["lengths"][b * k + j])
                samples[prompt_index][j] = make_sample(
                    self.tokenizer, prompt_index, j, out["tokens"][b * k + j, :n],
                    out["logprobs"][b * k + j, :n], bool(out["stopped"][b * k + j]))
                total += n
        return total

    def _pad_id(self) -> int:
        pad = self.config.pad_token_id
        if pad is None:
            pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0
