"""The continuous-batching engine on tiny random HF models: the same samples as the static
batches whatever the number of slots, a queue much longer than the slots, prompts of very
different lengths, rows stopped by the token limit, few compiled programs, memory errors."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_on_cpu_devices, save_hf, tiny_hf_model

from dice_jax.checkpoints.hf import import_hf_folder
from dice_jax.models.decoder import cache_bytes
from dice_jax.models.slot_decode import slot_attention, slot_rows, write_slots
from dice_jax.sampling import Sampler, SamplingConfig
from dice_jax.sampling import engine as slot_engine
from dice_jax.sampling import plan as slot_plan
from dice_jax.sampling import slots as slot_programs
from dice_jax.sampling.engine import attention_cost, grouped_order
from dice_jax.sampling.plan import plan_slots

# 1 to 70 tokens: prompt buckets 16, 32 and 128 in one call.
PROMPT_LENGTHS = [12, 7, 3, 70, 20, 5, 16, 1, 9]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = save_hf(tiny_hf_model("llama", initializer_range=0.3),
                     str(tmp_path_factory.mktemp("llama")))
    return import_hf_folder(folder)


def prompts(seed=0, vocab=97):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in PROMPT_LENGTHS]


def flat(result):
    return [s for group in result.samples for s in group]


PROGRAMS = (slot_programs.prefill, slot_programs.insert, slot_programs.decode_chunk,
            slot_programs.resize, slot_programs.permute_layer, slot_programs.permute_state)


def compiled_programs():
    return sum(f._cache_size() for f in PROGRAMS)


def test_same_samples_from_one_three_and_many_slots(llama, monkeypatch):
    params, config = llama
    reorders = []
    permute = slot_programs.permute

    def counted_permute(cache, state, order, **kw):
        reorders.append(np.asarray(order).tolist())
        return permute(cache, state, order, **kw)

    monkeypatch.setattr(slot_programs, "permute", counted_permute)
    # Reorder whenever the order changes (short rows here rarely save a whole chunk), so
    # the samples are checked across many reorders.
    monkeypatch.setattr(slot_engine, "REORDER_GAIN", 0.0)
    # Narrow the tail (24 -> 16 -> 10 slots) although rows take 80 tokens at most.
    monkeypatch.setattr(slot_plan, "NEW_TOKENS_PER_NARROWING", 40)
    sampler = Sampler(params, config)
    rows = prompts(seed=3)
    # Two common stop ids: most rows stop early, at many different lengths; the rest run
    # to the 80-token limit (two cache chunks of 64 past the 128-token prompt bucket).
    cfg = SamplingConfig(num_samples=3, max_new_tokens=80, temperature=1.0, top_p=0.9,
                         top_k=20, seed=7, stop_token_ids=(5, 9), progress=False)
    static = sampler.sample(rows, cfg, engine="static")
    before = compiled_programs()
    runs = {n: sampler.sample(rows, dataclasses.replace(cfg, max_slots=n), engine="continuous")
            for n in (1, 3, 24, None)}
    # 24 slots: 4 attention groups, slots reordered by length (27 slots: every request at
    # once, one group).
    assert sum(order != sorted(order) for order in reorders) >= 2
    # A handful of programs per slot count, not one per request (27 requests on 1 slot).
    assert compiled_programs() - before <= 32
    reference = flat(static)
    finish = {s.finish_reason for s in reference}
    assert finish == {"stop", "length"}
    assert len({s.length for s in reference}) > 8
    assert all(s.length == 80 for s in reference if s.finish_reason == "length")
    for n, run in runs.items():
        assert run.engine == "continuous"
        assert run.num_generated_tokens == static.num_generated_tokens
        for a, b in zip(reference, flat(run)):
            assert (b.prompt_index, b.sample_index) == (a.prompt_index, a.sample_index)
            assert b.token_ids.tolist() == a.token_ids.tolist(), (n, a.prompt_index)
            assert b.finish_reason == a.finish_reason
            # Slot decode (per-slot cache, chunked online softmax) against the static
            # sampler's shared-prompt softmax: float32 sums reordered, 1e-4 on ~-5.
            np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4)
    # One slot, a queue of 27 requests: the slot never idles while requests are left.
    assert runs[1].utilisation == 1.0
    assert runs[1].slot_steps == runs[1].num_generated_tokens
    assert 0 < runs[None].utilisation <= 1.0
    assert runs[3].num_batches > len(rows)  # many refills, each a chunk of decode steps


def test_budget_below_one_slot_names_the_prompt_and_sizes(llama):
    params, config = llama
    sampler = Sampler(params, config)
    rows = prompts()
    cfg = SamplingConfig(max_new_tokens=16, progress=False)
    one_slot = cache_bytes(config, 1, 128 + 64) + config.vocab_size * 4
    with pytest.raises(ValueError, match=r"below 1 decode slot\(s\) of \d+ bytes each: "
                                         r"prompt 3 has 70 tokens \(bucket 128\)"):
        sampler.sample(rows, dataclasses.replace(cfg, cache_budget_gb=one_slot / 2**30),
                       engine="continuous")
    with pytest.raises(ValueError, match="engine='fast'"):
        sampler.sample(rows, cfg, engine="fast")


def numpy_attention(q, k, v, lengths):
    """Each slot's new-token attention over its own first `lengths[i]` keys, in numpy: q
    `[S, heads, d]`, k / v `[S, kv_heads, keys, d]`."""
    s, h, d = q.shape
    kv = k.shape[1]
    want = np.zeros_like(q)
    for i in range(s):
        for head in range(h):
            group = head // (h // kv)
            keys, values = k[i, group, :lengths[i]], v[i, group, :lengths[i]]
            scores = keys @ q[i, head] / np.sqrt(d)
            weights = np.exp(scores - scores.max())
            want[i, head] = weights @ values / weights.sum()
    return want


def test_grouped_slot_attention_matches_numpy():
    """Grouped attention (chunks skipped past each group's longest slot) on 2 shards x 4
    groups against a numpy softmax over each slot's own keys."""
    rng = np.random.default_rng(0)
    s, kv, h, d, block, chunks = 16, 2, 4, 8, 4, 5
    k = rng.normal(size=(s, kv, block * chunks, d)).astype(np.float32)
    v = rng.normal(size=(s, kv, block * chunks, d)).astype(np.float32)
    q = rng.normal(size=(s, h, d)).astype(np.float32)
    lengths = rng.integers(1, block * chunks + 1, size=s)
    lengths[:8] = rng.integers(1, 3, size=8)  # a few groups need only chunk 0
    split = [{"k": jnp.asarray(k[:, :, c * block:(c + 1) * block].swapaxes(-1, -2)),
              "v": jnp.asarray(v[:, :, c * block:(c + 1) * block])} for c in range(chunks)]
    got = np.asarray(slot_attention(jnp.asarray(q), split, jnp.asarray(lengths, jnp.int32),
                                    None, 4, 2))
    np.testing.assert_allclose(got, numpy_attention(q, k, v, lengths), atol=1e-5)


def test_tiered_slot_attention_and_writes_match_numpy():
    """A tiered set (chunk c holds only the slots of the groups reaching it: 2 shards x 4
    groups holding 5, 5, 3, 2 chunks): a write lands in the slot's own row of its chunk,
    and attention equals a numpy softmax over each slot's own keys."""
    rng = np.random.default_rng(1)
    s, kv, h, d, block, shards = 16, 2, 4, 8, 4, 2
    group_chunks = (5, 5, 3, 2)
    n = s // (shards * 4)
    limits = np.asarray(group_chunks)[np.arange(s) // n % 4] * block
    k = rng.normal(size=(s, kv, block * 5, d)).astype(np.float32)
    v = rng.normal(size=(s, kv, block * 5, d)).astype(np.float32)
    q = rng.normal(size=(s, h, d)).astype(np.float32)
    lengths = np.minimum(rng.integers(1, block * 5 + 1, size=s), limits)
    chunks = []
    for c in range(5):
        rows = slot_rows(s, shards, group_chunks, c)
        held = np.argsort(np.where(rows >= 0, rows, s))[:int((rows >= 0).sum())]
        assert (rows[held] == np.arange(len(held))).all()
        chunks.append({"k": jnp.asarray(k[held, :, c * block:(c + 1) * block].swapaxes(-1, -2)),
                       "v": jnp.asarray(v[held, :, c * block:(c + 1) * block])})
    # Write each slot's last key/value afresh (zeroed first) at index length - 1.
    last = lengths - 1
    new_k, new_v = k[np.arange(s), :, last], v[np.arange(s), :, last]
    for c, chunk in enumerate(chunks):
        rows = slot_rows(s, shards, group_chunks, c)
        for slot in range(s):
            if rows[slot] >= 0 and last[slot] // block == c:
                chunk["k"] = chunk["k"].at[rows[slot], :, :, last[slot] % block].set(0.0)
                chunk["v"] = chunk["v"].at[rows[slot], :, last[slot] % block].set(0.0)
    chunks = write_slots(chunks, jnp.asarray(new_k), jnp.asarray(new_v),
                         jnp.asarray(last, jnp.int32), 4, shards)
    got = np.asarray(slot_attention(jnp.asarray(q), chunks, jnp.asarray(lengths, jnp.int32),
                                    None, 4, shards))
    np.testing.assert_allclose(got, numpy_attention(q, k, v, lengths), atol=1e-5)


def test_tiered_slots_give_the_same_samples_as_static_batches(llama, monkeypatch):
    """A budget that holds 32 tiered slots (two groups of each shard hold whole sequences,
    six half of them) but only 20 whole ones: rows that outgrow a short slot pause and are
    moved up; the samples are the static batches' ones."""
    params, config = llama
    moves = []
    permute = slot_programs.permute

    def counted_permute(cache, state, order, *, program):
        limits = program.slot_limits(len(order))
        order_list = np.asarray(order).tolist()
        moves.append(sum(limits[i] > limits[o] for i, o in enumerate(order_list)))
        return permute(cache, state, order, program=program)

    monkeypatch.setattr(slot_programs, "permute", counted_permute)
    monkeypatch.setattr(slot_plan, "NEW_TOKENS_PER_NARROWING", 200)  # 32 -> 20 slots
    sampler = Sampler(params, config)
    rows = prompts(seed=5)
    # One stop id: rows of every length up to the 200-token limit.
    cfg = SamplingConfig(num_samples=8, max_new_tokens=200, temperature=1.0, top_p=0.95,
                         seed=11, stop_token_ids=(5,), progress=False)
    # Prompt bucket 128 + 200 new tokens: 6 chunks of 64 a whole slot; 3 in a short one
    # (the bucket and one 64-step decode call).
    logits = config.vocab_size * 4
    chunk = cache_bytes(config, 1, 64)
    staged = 10 * (cache_bytes(config, 1, 128) + logits)
    budget = staged + 4 * (30 * chunk + 8 * logits)
    cfg = dataclasses.replace(cfg, cache_budget_gb=budget / 2**30)
    plan = plan_slots(config, PROMPT_LENGTHS, 8, 200, budget, None, 16, 1)
    assert plan.tiers == ((32, (6, 6, 3, 3, 3, 3, 3, 3)),)
    assert plan.widths == (32, 20)  # narrower: whole sequences fit
    flat_plan = plan_slots(config, PROMPT_LENGTHS, 8, 200, budget, None, 16, 1,
                           tiered_slots=False)
    assert flat_plan.tiers == () and 16 <= flat_plan.slots <= 20  # whole slots only
    assert budget < staged + 21 * (6 * chunk + logits)  # whole slots: 20 at most
    static = sampler.sample(rows, cfg, engine="static")
    tiered = sampler.sample(rows, cfg, engine="continuous")
    lengths = [s.length + len(rows[s.prompt_index]) for s in flat(static)]
    assert sum(n > 3 * 64 for n in lengths) >= 8  # rows that outgrow a short slot
    assert any(s.finish_reason == "length" for s in flat(static))
    assert sum(moves) > 0  # rows moved from a short slot to a longer one
    assert tiered.num_generated_tokens == static.num_generated_tokens
    for a, b in zip(flat(static), flat(tiered)):
        assert (b.prompt_index, b.sample_index) == (a.prompt_index, a.sample_index)
        assert b.token_ids.tolist() == a.token_ids.tolist(), (a.prompt_index, a.sample_index)
        assert b.finish_reason == a.finish_reason
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4)


def test_tiered_slots_on_two_data_shards_give_the_same_samples(tmp_path):
    """Tiered slots split over a 2-way `data` mesh (each shard's groups tiered alike) against
    static batches on one device."""
    folder = save_hf(tiny_hf_model("llama", initializer_range=0.3), str(tmp_path))
    result = run_on_cpu_devices("tiered_sampling.py", folder, devices=2)
    tiered, static = result["tiered"], result["static"]
    assert tiered["engine"] == "continuous"
    assert tiered["tiers"] == [[64, [4, 4, 2, 2, 2, 2, 2, 2]]]
    assert sum(n > 2 * 64 for n in static["lengths"]) >= 8  # rows outgrowing a short slot
    assert tiered["moved"] > 0
    assert tiered["tokens"] == static["tokens"]
    for a, b in zip(tiered["logprobs"], static["logprobs"]):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, atol=1e-4)


def test_grouped_order_puts_similar_lengths_together():
    lengths = [5, 900, 0, 300, 700, 10, 650, 20]
    order = grouped_order(lengths, shards=2, groups=2)
    assert sorted(order) == list(range(8))
    # Ranks 0..7 (longest first) dealt over 2 shards: shard p slot j holds rank 2j + p.
    ranked = sorted(range(8), key=lambda i: -lengths[i])
    assert order == [ranked[0], ranked[2], ranked[4], ranked[6],
                     ranked[1], ranked[3], ranked[5], ranked[7]]
    # Keys read per step: group j is slots {p*4 + j*2 + i}: (0, 1, 4, 5) longest 900 -> 15
    # chunks of 64, (2, 3, 6, 7) longest 650 -> 11 chunks; 4 slots each.
    assert attention_cost(lengths, 2, 2, 64) == 4 * 64 * (15 + 11)
    # Reordered: (900, 650, 700, 300) -> 15 chunks, (10, 0, 20, 5) -> 1 chunk.
    assert attention_cost([lengths[i] for i in order], 2, 2, 64) == 4 * 64 * (15 + 1)


def test_auto_engine_is_continuous_only_for_a_queue_of_long_requests(llama):
    from dice_jax.sampling.sampler import STATIC_MAX_NEW_TOKENS

    params, config = llama
    sampler = Sampler(params, config)
    rows = prompts()
    cfg = SamplingConfig(num_samples=2, max_new_tokens=STATIC_MAX_NEW_TOKENS + 1,
                         progress=False)
    assert sampler.engine("auto", cfg, rows) == "static"  # 18 requests, 18 slots
    queued = dataclasses.replace(cfg, max_slots=8)
    assert sampler.engine("auto", queued, rows) == "continuous"
    assert sampler.engine("static", queued, rows) == "static"
    short = dataclasses.replace(queued, max_new_tokens=STATIC_MAX_NEW_TOKENS)
    assert sampler.engine("auto", short, rows) == "static"
    assert sampler.engine("continuous", short, rows) == "continuous"
    assert sampler.sample(rows, dataclasses.replace(short, max_new_tokens=8)).engine == "static"
