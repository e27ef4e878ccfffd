"""The sampler on tiny random HF models: greedy parity with transformers, the KV cache,
stopping, reproducibility, log-probs, input checks and memory batching."""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import padded_batch, run_on_cpu_devices, save_hf, tiny_hf_model

from dice_jax.checkpoints.hf import import_hf_folder
from dice_jax.models import decoder
from dice_jax.models.decoder import Decoder, cache_bytes, init_cache, positions_from_mask
from dice_jax.sampling import Sampler, SamplingConfig

PROMPT_LENGTHS = [12, 7, 3, 9, 20, 5, 16, 1]


def prompts(n=4, seed=0, vocab=97):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)]).tolist()
            for i in range(n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for kind, kw in [("llama", dict(initializer_range=0.3)), ("mistral", {})]:
        model = tiny_hf_model(kind, **kw)
        folder = save_hf(model, str(tmp_path_factory.mktemp(kind)))
        params, config = import_hf_folder(folder)
        out[kind] = (model, params, config)
    return out


def hf_greedy(model, rows, max_new, eos=2, pad=0):
    """transformers' greedy continuation of each row (left-padded batch), cut after eos."""
    total = max(map(len, rows))
    ids = np.full((len(rows), total), pad, np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, total - len(r):] = r
        mask[i, total - len(r):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             do_sample=False, max_new_tokens=max_new, eos_token_id=eos,
                             pad_token_id=pad)[:, total:].numpy()
    result = []
    for row in out.tolist():
        result.append(row[:row.index(eos) + 1] if eos in row else row)
    return result


def forward_logprobs(params, config, pairs):
    """Log-probs of each (prompt, response)'s response tokens under one full forward pass
    over a right-padded batch."""
    total = max(len(p) + len(r) for p, r in pairs)
    ids = np.zeros((len(pairs), total), np.int32)
    mask = np.zeros_like(ids)
    for i, (p, r) in enumerate(pairs):
        ids[i, :len(p) + len(r)] = list(p) + list(r)
        mask[i, :len(p) + len(r)] = 1
    # Parameters as an argument, not closed over: XLA would fold them in as constants.
    logits = jax.jit(lambda prm, i, m: jax.nn.log_softmax(Decoder(config).apply(
        {"params": prm}, i, positions_from_mask(m), m).astype(jnp.float32), axis=-1))(
        params, jnp.asarray(ids), jnp.asarray(mask))
    logits = np.asarray(logits)
    return [logits[i, np.arange(len(p) - 1, len(p) + len(r) - 1), np.asarray(r)]
            for i, (p, r) in enumerate(pairs)]


@pytest.mark.parametrize("engine", ["continuous", "static"])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_greedy_matches_transformers(models, kind, engine):
    model, params, config = models[kind]
    rows = prompts(4, seed=1)
    # 40 new tokens: static, two decode phases (chunks of 32); continuous, two cache chunks
    # of 64 after the 32-token prompt bucket; mistral's window (5) bites.
    result = Sampler(params, config).sample(rows, SamplingConfig(
        num_samples=2, max_new_tokens=40, temperature=0.0, progress=False), engine=engine)
    ref = hf_greedy(model, rows, 40)
    for i, expected in enumerate(ref):
        for sample in result.samples[i]:
            assert sample.token_ids.tolist() == expected, (i, sample.sample_index)
            assert sample.finish_reason == ("stop" if expected[-1] == 2 else "length")
    assert len({tuple(r) for r in ref}) > 1 and max(len(set(r)) for r in ref) > 5
    if kind == "mistral":  # guard: the sliding window changes these continuations
        windowless = Sampler(params, config.replace(sliding_window=None)).sample(
            rows, SamplingConfig(max_new_tokens=40, temperature=0.0, progress=False),
            engine=engine)
        assert any(s[0].token_ids.tolist() != r for s, r in zip(windowless.samples, ref))


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_decoder_extend_matches_forward(models, kind):
    _, params, config = models[kind]
    ids, mask = padded_batch(config.vocab_size, [12, 7, 3], 12, left=[True] * 3, seed=1)
    positions = positions_from_mask(jnp.asarray(mask))
    full = np.asarray(Decoder(config).apply({"params": params}, jnp.asarray(ids), positions,
                                            jnp.asarray(mask)))
    cache_mask = jnp.concatenate([jnp.asarray(mask), jnp.ones((3, 4), jnp.int32)], 1)
    extend = jax.jit(lambda prm, i, p, c, t: Decoder(config).apply(
        {"params": prm}, i, p, cache_mask, c, t, method=Decoder.extend))
    logits, cache = extend(params, jnp.asarray(ids[:, :8]), positions[:, :8],
                           init_cache(config, 3, 16), jnp.int32(0))
    pieces = [np.asarray(logits)]
    for t in range(8, 12):  # then one token at a time
        logits, cache = extend(params, jnp.asarray(ids[:, t:t + 1]), positions[:, t:t + 1],
                               cache, jnp.int32(t))
        pieces.append(np.asarray(logits))
    real = mask.astype(bool)
    # float32 logits ~1-10: one-token steps against one full forward reorder the
    # attention sums; 1e-4 is ~100 roundoffs and far below any cache bug.
    assert np.max(np.abs(np.concatenate(pieces, 1)[real] - full[real])) <= 1e-4


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_extend_at_a_static_slot_attends_in_causal_blocks(models, kind, monkeypatch):
    """A Python-int slot reaches the layers inside the layer scan as an int, so attention
    runs in causal query blocks (150 queries: 64 + 64 + 22), with the logits of a traced
    slot and of the full forward."""
    _, params, config = models[kind]
    ids, mask = padded_batch(config.vocab_size, [170, 120, 160], 170, left=[True] * 3, seed=2)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    positions = positions_from_mask(mask)
    full = np.asarray(Decoder(config).apply({"params": params}, ids, positions, mask))
    offsets = []
    attention = decoder.grouped_attention
    monkeypatch.setattr(decoder, "grouped_attention",
                        lambda *a: offsets.append(a[4]) or attention(*a))

    def extend(slot):
        run = functools.partial(Decoder(config).apply, {"params": params},
                                method=Decoder.extend)
        _, cache = run(ids[:, :20], positions[:, :20], mask, init_cache(config, 3, 170), 0)
        return np.asarray(run(ids[:, 20:], positions[:, 20:], mask, cache, slot)[0])

    static = extend(20)
    assert set(offsets) == {0, 20}  # the prefill's slot, then the extension's
    done = len(offsets)
    traced = extend(jnp.int32(20))
    assert set(offsets[done:]) == {0, None}  # a traced slot: one block of all queries
    real = np.asarray(mask[:, 20:]).astype(bool)
    # float32, differently blocked attention sums (as above): 1e-4.
    assert np.max(np.abs(static - traced)[real]) <= 1e-4
    assert np.max(np.abs(static - full[:, 20:])[real]) <= 1e-4


def test_rows_stop_independently(models):
    _, params, config = models["mistral"]
    sampler = Sampler(params, config)
    rows = prompts(4, seed=2)
    unused = 96
    for _ in range(3):  # a stop id that greedy never emits here
        free = sampler.sample(rows, SamplingConfig(max_new_tokens=24, temperature=0.0,
                                                   stop_token_ids=(unused,), progress=False),
                              engine="static")
        full = [s[0].token_ids.tolist() for s in free.samples]
        seen = {t for f in full for t in f}
        if unused not in seen:
            break
        unused = max(set(range(3, config.vocab_size)) - seen)
    assert all(len(f) == 24 and unused not in f for f in full)
    stops = {full[0][3], full[1][9], full[2][1], full[3][6]}
    stopped = sampler.sample(rows, SamplingConfig(max_new_tokens=24, temperature=0.0,
                                                  stop_token_ids=tuple(stops), progress=False),
                             engine="static")
    lengths = []
    for (unstopped,), (sample,) in zip(free.samples, stopped.samples):
        f = unstopped.token_ids.tolist()
        end = min(i for i, t in enumerate(f) if t in stops) + 1
        lengths.append(end)
        assert sample.token_ids.tolist() == f[:end]  # nothing after the stop token
        assert sample.finish_reason == "stop" and sample.length == end
        # The same prefix in a different batch: float32 roundoff of log-probs ~-5.
        np.testing.assert_allclose(sample.logprobs, unstopped.logprobs[:end], atol=1e-5)
    assert len(set(lengths)) > 1
    assert stopped.decode_steps == max(lengths) - 1 < 23  # the loop left early


def test_same_samples_whatever_the_batch_size(models):
    _, params, config = models["llama"]
    sampler = Sampler(params, config)
    rows = prompts(8, seed=3)  # lengths 1..20: buckets 16 and 32
    cfg = SamplingConfig(num_samples=3, max_new_tokens=16, temperature=1.0, top_p=0.9,
                         top_k=20, seed=7, progress=False)
    together = sampler.sample(rows, cfg, engine="static")
    alone = sampler.sample(rows, dataclasses.replace(cfg, max_batch_prompts=1), engine="static")
    assert together.num_batches == 2 and alone.num_batches == 8
    for a, b in zip(together.samples, alone.samples):
        for x, y in zip(a, b):
            assert x.token_ids.tolist() == y.token_ids.tolist()
            # Batched with others or alone: padding reorders float32 sums; log-probs ~-5, 1e-4.
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-4)
    texts = [tuple(s.token_ids.tolist()) for group in together.samples for s in group]
    assert len(set(texts)) > len(texts) // 2  # samples differ from each other
    other = sampler.sample(rows, dataclasses.replace(cfg, seed=8), engine="static")
    assert [s.token_ids.tolist() for g in other.samples for s in g] != [list(t) for t in texts]


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_logprobs_match_full_forward(models, kind):
    _, params, config = models[kind]
    rows = prompts(3, seed=4)
    # Tempered and filtered sampling; the log-probs must still be the untempered policy's.
    result = Sampler(params, config).sample(rows, SamplingConfig(
        num_samples=2, max_new_tokens=40, temperature=0.8, top_k=20, seed=1, progress=False))
    samples = [s for group in result.samples for s in group]
    refs = forward_logprobs(params, config, [(rows[s.prompt_index], s.token_ids)
                                             for s in samples])
    for sample, ref in zip(samples, refs):
        # Decode steps against one full float32 forward: reordered sums, 1e-4 on ~-5.
        assert np.max(np.abs(sample.logprobs - ref)) <= 1e-4
        assert np.all(sample.logprobs <= 0)


def test_bfloat16_cache_stays_close(models):
    _, params, config = models["mistral"]
    sampler = Sampler(params, config)
    rows = prompts(3, seed=6)
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0, progress=False)
    f32 = sampler.sample(rows, cfg)
    bf16 = sampler.sample(rows, dataclasses.replace(cfg, cache_dtype="bfloat16"))
    for (a,), (b,) in zip(f32.samples, bf16.samples):
        assert a.token_ids[0] == b.token_ids[0]
        # A bfloat16 KV cache rounds K/V by 2**-9 relative: over a prompt's attention the
        # first token's log-prob (~-1 to -5) moves by a few 0.01 at most.
        assert abs(a.logprobs[0] - b.logprobs[0]) < 0.05


def test_bad_prompts_are_named(models, caplog):
    _, params, config = models["llama"]
    sampler = Sampler(params, config)
    cfg = SamplingConfig(max_new_tokens=4, max_prompt_tokens=10, progress=False)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.sample([[5, 6], []], cfg)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.sample([[5, 6], "  "], cfg)
    with pytest.raises(ValueError, match=r"prompt 2 has 12 tokens.*max_prompt_tokens=10"):
        sampler.sample([[5, 6], [7], list(range(3, 15))], cfg)
    with caplog.at_level(logging.WARNING, logger="dice_jax.sampling"):
        result = sampler.sample([[5, 6], [7], list(range(3, 15))],
                                dataclasses.replace(cfg, truncate_prompts=True))
    assert result.num_truncated == 1 and "left-truncated 1 prompt" in caplog.text
    assert result.prompt_token_ids[2] == list(range(5, 15))
    assert [len(g) for g in result.samples] == [1, 1, 1]


def test_memory_budget_splits_batches(models):
    _, params, config = models["mistral"]
    sampler = Sampler(params, config)
    rows = [r[:5] for r in prompts(5, seed=5) if r] + [[4, 5, 6]]
    cfg = SamplingConfig(num_samples=2, max_new_tokens=8, temperature=0.8, progress=False)
    # One prompt: its 16-slot prompt cache + 2 samples x 32 generated slots (one chunk).
    per_prompt = cache_bytes(config, 1, 16) + cache_bytes(config, 2, 32)
    tight = dataclasses.replace(cfg, cache_budget_gb=(2 * per_prompt + 1) / 2**30)
    assert sampler.batch_prompts(16, tight) == 2
    assert sampler.compile(rows, tight, engine="static") > 0  # one step per batch shape
    small = sampler.sample(rows, tight, engine="static")
    big = sampler.sample(rows, cfg, engine="static")
    assert small.num_batches == 3 and big.num_batches == 1
    assert ([s.token_ids.tolist() for g in small.samples for s in g]
            == [s.token_ids.tolist() for g in big.samples for s in g])
    with pytest.raises(ValueError, match=r"\(100 bytes\) is below one prompt"):
        sampler.sample(rows, dataclasses.replace(cfg, cache_budget_gb=100 / 2**30),
                       engine="static")


def test_eight_devices_match_one_device(tmp_path):
    folder = save_hf(tiny_hf_model("llama", initializer_range=0.3), str(tmp_path / "m"))
    result = run_on_cpu_devices("sharded_sampling.py", folder)
    assert result["devices"] == 8
    single = result["single"]
    for name in ("single_static", "data8", "data8_static", "d2f2t2"):
        run = result[name]
        assert run["tokens"] == single["tokens"], name
        for a, b in zip(run["logprobs"], single["logprobs"]):
            for x, y in zip(a, b):
                # 8 devices against 1: the sharded matmuls' float32 sums are reordered; 1e-4.
                assert np.max(np.abs(np.asarray(x) - np.asarray(y))) <= 1e-4
    # Sampling placement: no fsdp split of the weights; heads split over `tensor`.
    assert result["data8"]["q_spec"] == "P(None, None, None, None)"
    assert result["d2f2t2"]["q_spec"] == "P(None, None, 'tensor', None)"
    assert result["d2f2t2"]["q_devices"] == 8
