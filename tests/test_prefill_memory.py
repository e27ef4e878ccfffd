"""Prefill memory: the per-prompt estimate (`generate.prefill_bytes`) against the peak
temporary memory XLA reports for the compiled prefill programs, and both engines holding
each prefill call to the budget's prefill share (`generate.PREFILL_SHARE`) without changing
any sample."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_on_cpu_devices

from dice_jax.checkpoints.random_init import random_model
from dice_jax.models.presets import tiny
from dice_jax.sampling import Sampler, SamplingConfig
from dice_jax.sampling import sampler as sampler_module
from dice_jax.sampling import slots as slot_programs
from dice_jax.sampling.distributions import Distribution
from dice_jax.sampling.generate import (
    PREFILL_SHARE,
    Program,
    empty_prompt,
    prefill,
    prefill_bytes,
    prefill_fit,
    prefill_part,
)
from dice_jax.sharding import param_shapes

LENGTH = 256  # the prompts' bucket in the sampling tests


@pytest.fixture(scope="module")
def model():
    params, config, _ = random_model("tiny")
    return params, config


def prompts(n, seed=0):
    """n prompts of LENGTH/2+1 .. LENGTH tokens: all in the LENGTH bucket."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, size=int(k)).tolist()
            for k in rng.integers(LENGTH // 2 + 1, LENGTH + 1, size=n)]


def temp_bytes(fn, *args, **kwargs) -> int:
    """XLA's peak temporary memory of `fn` compiled for these (abstract) arguments."""
    return fn.lower(*args, **kwargs).compile().memory_analysis().temp_size_in_bytes


def budget_for(config, fit: float) -> float:
    """A cache_budget_gb whose prefill share holds `fit` prompts' estimate at LENGTH."""
    return fit * prefill_bytes(config, LENGTH) / PREFILL_SHARE / 2**30


@pytest.mark.parametrize("name,config,length", [
    ("tiny", tiny(), 512),
    ("tiny", tiny(), 2048),
    ("wide_gqa", tiny(num_heads=16, num_kv_heads=4, hidden_size=256, intermediate_size=512),
     1024),
    ("deep_bf16", tiny(num_layers=6, num_kv_heads=4, hidden_size=128, intermediate_size=512,
                       dtype="bfloat16"), 1024),
])
def test_prefill_bytes_bounds_xla_temp_memory(name, config, length):
    # Stated factor 2: each prompt a prefill call holds adds at least 1/2 and at most all of
    # `prefill_bytes` to XLA's peak temporary bytes of the compiled program (the estimate
    # measured 1.16x-1.39x it for these shapes), so a budget the estimate respects is kept and
    # at most half of it is wasted. The whole call's temporaries are within n estimates
    # plus a per-call constant below the weights' float32 bytes (weight slices; on CPU,
    # bfloat16 weights converted for the matmuls).
    params = param_shapes(config)
    weights = 4 * sum(a.size for a in jax.tree.leaves(params))
    program = Program(config, Distribution(1.0, 0, 1.0), 1, 8, (2,))
    start = jax.ShapeDtypeStruct((), np.int32)

    def temps(n: int) -> dict[str, int]:
        ids = jax.ShapeDtypeStruct((n, length), np.int32)
        rows = jax.ShapeDtypeStruct((n,), np.int32)
        slot_program = slot_programs.SlotProgram(config, Distribution(1.0, 0, 1.0), 8, (2,),
                                                 length + 64, length, 5, 8)
        staging = jax.eval_shape(lambda: slot_programs.init_staging(slot_program))
        full = jax.eval_shape(lambda: empty_prompt(program=program, batch=8, length=length))
        return {
            "static": temp_bytes(prefill, params, ids, ids, program=program),
            "slots": temp_bytes(slot_programs.prefill, params, *staging, ids, rows, rows,
                                program=slot_program),
            "part": temp_bytes(prefill_part, params, *full, ids, ids, start,
                               program=program, shards=1),
        }

    estimate = prefill_bytes(config, length)
    two, four = temps(2), temps(4)
    for program_name in two:
        per_prompt = (four[program_name] - two[program_name]) / 2
        assert per_prompt <= estimate <= 2 * per_prompt, (name, length, program_name,
                                                          per_prompt, estimate)
        assert four[program_name] <= 4 * estimate + weights, (name, length, program_name)


def left_padded(rows, size, length, pad=0):
    """The static engine's prefill input: rows left-padded to `length`, the last row
    repeated up to `size` rows."""
    ids = np.full((size, length), pad, np.int32)
    mask = np.zeros((size, length), np.int32)
    for r in range(size):
        seq = rows[min(r, len(rows) - 1)]
        ids[r, length - len(seq):] = seq
        mask[r, length - len(seq):] = 1
    return ids, mask


@pytest.mark.parametrize("fit", [1, 3])
def test_static_prefill_parts_fit_the_budget_and_change_no_sample(model, monkeypatch, fit):
    params, config = model
    rows = prompts(12, seed=1)
    cfg = SamplingConfig(num_samples=2, max_new_tokens=8, temperature=1.0, top_k=20, seed=3,
                         progress=False)
    # fit=3: three prompts' activations fit the prefill share; fit=1: not even one does
    # (0.9 of one prompt's), so each call holds one prompt. The KV cache of all 12 fits.
    budget = budget_for(config, fit + 0.5 if fit > 1 else 0.9)
    tight = dataclasses.replace(cfg, cache_budget_gb=budget)
    sampler = Sampler(params, config)
    plan = sampler.plan([len(r) for r in rows], tight)
    assert [(b.size, b.bucket, b.prefill_rows) for b in plan] == [(16, LENGTH, fit)]
    assert prefill_fit(config, LENGTH, tight.cache_budget_bytes) == fit
    assert sampler.plan([len(r) for r in rows], cfg)[0].prefill_rows == 16

    calls = []
    real = sampler_module.prefill_part

    def counted(params, segments, logits, ids, mask, start, **kw):
        if not calls:  # XLA's own count for the call's shapes: within the share too
            calls.append(temp_bytes(real, params, segments, logits, ids, mask, start, **kw))
        calls.append((ids.shape, int(start)))
        return real(params, segments, logits, ids, mask, start, **kw)

    monkeypatch.setattr(sampler_module, "prefill_part", counted)
    small = sampler.sample(rows, tight, engine="static")
    temp, parts = calls[0], calls[1:]
    assert all(shape == (fit, LENGTH) for shape, _ in parts)
    covered = sorted({s + i for _, s in parts for i in range(fit)})
    assert covered == list(range(16)) and len(parts) == -(-16 // fit)
    share = PREFILL_SHARE * tight.cache_budget_bytes
    if fit > 1:
        assert fit * prefill_bytes(config, LENGTH) <= share and temp <= share
    else:  # one prompt is more than the share: it still runs, alone
        assert prefill_bytes(config, LENGTH) > share

    # The parts' cache and logits are the one-call prefill's, row for row.
    program = sampler.program(tight)
    ids, mask = left_padded(rows, 16, LENGTH)
    one_segments, one_logits = prefill(params, jnp.asarray(ids), jnp.asarray(mask),
                                       program=program)
    segments, logits = sampler._prefill_parts(ids, mask, fit, program)
    np.testing.assert_allclose(logits, one_logits, atol=1e-5)
    for seg, one in zip(segments, one_segments):
        for name in ("k", "v"):
            np.testing.assert_allclose(seg[name], one[name], atol=1e-5)

    big = sampler.sample(rows, cfg, engine="static")  # the default budget: one call
    assert small.shapes == big.shapes == [(16, LENGTH)]
    for a, b in zip(small.samples, big.samples):
        for x, y in zip(a, b):
            assert x.token_ids.tolist() == y.token_ids.tolist()
            # Another batch per prefill call reorders float32 sums: 1e-4 on log-probs ~-5.
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-4)


def test_continuous_prefill_calls_fit_the_budget_and_change_no_sample(model, monkeypatch):
    params, config = model
    rows = prompts(12, seed=2)
    cfg = SamplingConfig(num_samples=2, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=4,
                         max_slots=8, progress=False)
    tight = dataclasses.replace(cfg, cache_budget_gb=budget_for(config, 3.5))
    sampler = Sampler(params, config)
    token_ids, _ = sampler.prepare(rows, tight)
    plan = sampler.slot_engine(token_ids, tight).plan
    # Up to 5 new prompts a refill (4 slots' worth + 1): prefill sizes 1..8; the share holds
    # 3 prompts, so calls of at most 2 (the sizes are powers of two).
    assert plan.prefill_sizes == (1, 2, 4, 8) and plan.prefill_limits == (2,)
    assert sampler.slot_engine(token_ids, cfg).plan.prefill_limits == (8,)
    assert plan.slots == sampler.slot_engine(token_ids, cfg).plan.slots == 8

    sizes = []
    real = slot_programs.prefill

    def counted(params, staging, staging_logits, ids, *args, **kw):
        sizes.append(ids.shape[0])
        return real(params, staging, staging_logits, ids, *args, **kw)

    monkeypatch.setattr(slot_programs, "prefill", counted)
    small = sampler.sample(rows, tight, engine="continuous")
    assert sizes and max(sizes) == 2
    assert 2 * prefill_bytes(config, LENGTH) <= PREFILL_SHARE * tight.cache_budget_bytes
    sizes.clear()
    big = sampler.sample(rows, cfg, engine="continuous")
    assert max(sizes) > 2  # unconstrained, a refill prefills its new prompts at once
    for a, b in zip(small.samples, big.samples):
        for x, y in zip(a, b):
            assert x.token_ids.tolist() == y.token_ids.tolist()
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-4)


def test_prefill_parts_on_eight_devices():
    result = run_on_cpu_devices("prefill_parts.py", str(LENGTH))
    assert result["devices"] == 8
    single = result["single"]
    for name in ("sharded_parts", "replicated_parts", "continuous"):
        run = result[name]
        assert run["tokens"] == single[run["case"]]["tokens"], name
        for a, b in zip(run["logprobs"], single[run["case"]]["logprobs"]):
            for x, y in zip(a, b):
                # 8 devices against 1: reordered float32 sums, 1e-4 on log-probs ~-5.
                np.testing.assert_allclose(x, y, atol=1e-4)
    # 16 rows over 8 shards: two calls of one prompt per shard, each shard writing only its
    # own rows (no collective in the compiled part).
    assert result["sharded_parts"]["calls"] == [[8, 0], [8, 1]]
    assert result["sharded_parts"]["collectives"] == 0
    # 4 rows (K=8: 32 decode rows) are not split over 8 shards: every device would hold a
    # call's prompts, so calls of one prompt.
    assert result["replicated_parts"]["calls"] == [[1, 0], [1, 1], [1, 2], [1, 3]]
    assert result["continuous"]["max_call"] == 8  # one prompt per data shard

