"""Scoring a DICE round: the sampler's log-probs against a full forward, scores against two
independent model forwards, 8 simulated devices against 1, the samples store on disk, and
ScoredSamples feeding the round's data builder."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_on_cpu_devices

from dice_jax.checkpoints.random_init import random_model
from dice_jax.data import prompt_text
from dice_jax.dice.alpha_search import AlphaSearchConfig
from dice_jax.dice.builder import DiceDataConfig, build_round_data
from dice_jax.dice.filters import FilterConfig
from dice_jax.dice.scoring import score_samples
from dice_jax.errors import DiceError
from dice_jax.models.decoder import Decoder
from dice_jax.sampling import Sampler, SamplingConfig
from dice_jax.sampling.store import (
    SAMPLES_JSONL,
    SAMPLES_META,
    SAMPLES_NPZ,
    SampleSet,
    load_samples,
    save_samples,
)
from dice_jax.training.scoring import bucket_length, plan_batches, plan_prompt_groups

PROMPTS = ["Say hello.", [{"role": "user", "content": "What is 2 + 2?"}],
           "Tell a story about a cat.", "Hi"]
MAX_NEW = 16


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Policy (seed 0) samples K=4 responses per prompt; reference = seed 1; both float32."""
    policy, config, tokenizer = random_model("tiny", seed=0)
    reference, _, _ = random_model("tiny", seed=1)
    # A broad stop set: some responses stop (ids + stop token), some hit MAX_NEW.
    sampling = SamplingConfig(num_samples=4, max_new_tokens=MAX_NEW, temperature=1.0, seed=5,
                              stop_token_ids=tuple(range(100, 110)), min_bucket=64,
                              progress=False)  # one prompt bucket: one program to compile
    result = Sampler(policy, config, tokenizer).sample(PROMPTS, sampling)
    folder = str(tmp_path_factory.mktemp("sample"))
    save_samples(folder, PROMPTS, result, extra={"seed": 5})
    samples = load_samples(folder)
    return dict(policy=policy, reference=reference, config=config, result=result,
                folder=folder, samples=samples,
                direct_policy=direct_logps(policy, config, samples),
                direct_reference=direct_logps(reference, config, samples))


def direct_logps(params, config, samples: SampleSet) -> list[list[np.ndarray]]:
    """Per-token log-probs `[P][K][length]` of every response after its prompt, computed
    independently of the scorer: full logits from `Decoder.apply` (each row right-padded
    to one width, which causal attention cannot see), then a float64 numpy log-softmax and
    a pick at each response position."""
    rows = [(samples.prompt_token_ids[i], y) for i, row in enumerate(samples.token_ids)
            for y in row]
    width = max(len(p) + len(y) for p, y in rows)
    ids = np.zeros((len(rows), width), np.int32)
    for r, (p, y) in enumerate(rows):
        ids[r, :len(p) + len(y)] = list(p) + list(y)
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), ids.shape)
    logits = np.asarray(jax.jit(lambda prm, i: Decoder(config).apply(
        {"params": prm}, i, positions, jnp.ones_like(i)))(params, ids), np.float64)
    logsm = logits - logits.max(-1, keepdims=True)
    logsm -= np.log(np.exp(logsm).sum(-1, keepdims=True))
    out = [logsm[r, np.arange(len(p) - 1, len(p) + len(y) - 1), np.asarray(y)]
           for r, (p, y) in enumerate(rows)]
    k = samples.num_samples
    return [out[i * k:(i + 1) * k] for i in range(samples.num_prompts)]


def sums(per_token: list[list[np.ndarray]]) -> np.ndarray:
    return np.array([[t.sum() for t in row] for row in per_token])


def test_sampler_logprobs_equal_full_forward(run):
    """(a) Reusing the sampler's log-probs for log pi is justified: they equal a full
    forward's, for responses that stopped and responses that hit the length limit."""
    result = run["result"]
    reasons = {s.finish_reason for row in result.samples for s in row}
    assert reasons == {"stop", "length"}, reasons
    for row in result.samples:
        for s in row:
            if s.finish_reason == "stop":
                assert 100 <= s.token_ids[-1] < 110  # the stop token is scored too
            else:
                assert s.length == MAX_NEW
            ref = run["direct_policy"][s.prompt_index][s.sample_index]
            # The sampler's per-token log-probs (~-5) against a direct float32 forward: decode
            # steps reorder the attention sums, ~2e-5; their sums over <= 40 tokens, 1e-4.
            np.testing.assert_allclose(s.logprobs, ref, atol=2e-5)
            assert abs(float(s.logprobs.sum(dtype=np.float64)) - ref.sum()) <= 1e-4


def test_scores_equal_two_direct_forwards(run):
    """(b) log pi and log pi_ref per (prompt, response) equal two independent forwards,
    whether log pi is reused or recomputed, prompts shared (run once, responses against
    their KV cache; tokens packed or padded) or not, whatever the batching and grouping."""
    samples, config = run["samples"], run["config"]
    want_ref, want_pi = sums(run["direct_reference"]), sums(run["direct_policy"])
    assert np.abs(want_ref - want_pi).max() > 1.0  # two really different models
    counts = np.array([[len(y) for y in row] for row in samples.token_ids])
    for kw in (dict(batch_size=16),
               dict(batch_size=3, buckets="pow2", prompt_group=3, pack_tokens=False),
               dict(batch_size=5, buckets=32, chunk_size=8, share_prompts=False)):
        scored = score_samples(samples, config, run["reference"], run["policy"],
                               reuse_policy_logps=False, progress=False, **kw)
        # Packed / chunked / bucketed layouts reorder float32 sums of <= 40 token log-probs
        # (~-5 each, ~200 in total): ~1e-5; 1e-4 absolute.
        np.testing.assert_allclose(scored.logp_reference, want_ref, atol=1e-4, rtol=0)
        np.testing.assert_allclose(scored.logp_policy, want_pi, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(scored.token_counts, counts)
    reused = score_samples(samples, config, run["reference"], progress=False)
    # As above: float32 sums of <= 40 token log-probs, another layout.
    np.testing.assert_allclose(reused.logp_policy, want_pi, atol=1e-4, rtol=0)
    np.testing.assert_allclose(reused.logp_reference, want_ref, atol=1e-4, rtol=0)
    assert reused.logp_policy.dtype == reused.logp_reference.dtype == np.float32
    assert reused.prompts[1] == "What is 2 + 2?" and reused.prompts[0] == PROMPTS[0]
    assert reused.finish_reasons == samples.finish_reasons
    assert reused.responses == samples.texts
    with pytest.raises(DiceError, match="needs policy_params"):
        score_samples(samples, config, run["reference"], reuse_policy_logps=False)


def test_batch_plan_and_buckets():
    assert [bucket_length(n, 64) for n in (1, 64, 65, 300)] == [64, 64, 128, 320]
    assert [bucket_length(n, "pow2") for n in (1, 17, 300)] == [16, 32, 512]
    # auto: four lengths per octave, at least 32 apart; under 25% padding
    auto = [bucket_length(n) for n in range(1, 5000)]
    assert auto[:33] == [32] * 32 + [64] and bucket_length(300) == 320
    assert bucket_length(1500) == 1536 and bucket_length(2049) == 2560
    assert all(n <= b < n * 1.25 + 32 for n, b in zip(range(1, 5000), auto))
    assert len(set(auto)) <= 8 + 4 * 5  # 32..256 by 32, then 4 per octave up to 5000
    with pytest.raises(DiceError, match="buckets"):
        bucket_length(5, 0)
    lengths = [130, 200, 64, 390, 256, 129, 5]
    plan = plan_batches(lengths, 3, 64)
    assert [p[0] for p in plan] == [448, 192, 64]
    assert sorted(i for _, idx in plan for i in idx) == list(range(7))
    for length, idx in plan:
        assert all(lengths[i] <= length for i in idx) and len(idx) <= 3
    # Shared prompts: each used prompt in one group, each response row once, groups of
    # one shape (a multiple of the data-parallel size), prompts padded to their bucket.
    prompt_lengths, index = [70, 10, 200, 5, 64], [0, 0, 2, 2, 4, 4, 1, 2]
    groups = plan_prompt_groups(prompt_lengths, index, rows=2, multiple=2, buckets=64,
                                prompt_group=1)
    assert [(size, width, members) for size, width, members, _ in groups] == [
        (2, 256, [2, 0]), (2, 64, [4, 1])]
    assert sorted(n for *_, rows in groups for n in rows) == list(range(len(index)))
    assert plan_prompt_groups(prompt_lengths, index, rows=16)[0][0] == 4  # one group
    assert prompt_text([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
                       ) == "u"
    # Multi-turn chats and token ids have no D_offline prompt string: named errors.
    with pytest.raises(DiceError, match="prompt 3: only single-turn"):
        prompt_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "user", "content": "c"}], "prompt 3")
    with pytest.raises(DiceError, match="expected a string or a list of chat messages"):
        prompt_text([5, 6])


def test_sharded_scoring_matches_one_device():
    """(c) fsdp=8 and data=2 x fsdp=2 x tensor=2 give one device's scores."""
    result = run_on_cpu_devices("sharded_scoring.py", timeout=300)
    assert result["devices"] == 8
    single = result["single"]
    for name in ("fsdp8", "d2f2t2"):
        for key in ("reference", "policy"):
            # Sharded float32 matmuls reorder sums; sequence log-probs ~-200: 1e-4 absolute.
            np.testing.assert_allclose(result[name][key], single[key], atol=1e-4, rtol=0)
        assert result[name]["counts"] == single["counts"]
    assert "fsdp" in result["fsdp8"]["q_spec"] and "fsdp" in result["fsdp8"]["batch_spec"]
    assert result["fsdp8"]["data_parallel"] == 8 and result["d2f2t2"]["data_parallel"] == 4
    assert "tensor" in result["d2f2t2"]["q_spec"] and "data" in result["d2f2t2"]["batch_spec"]


def test_store_round_trip(run, tmp_path):
    """(d) Everything the sampler produced comes back exactly; JSONL reads in datasets."""
    result, loaded = run["result"], run["samples"]
    assert loaded.prompts == [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]]
    assert loaded.prompt_token_ids == result.prompt_token_ids
    assert loaded.extra == {"seed": 5}
    for i, row in enumerate(result.samples):
        for j, s in enumerate(row):
            assert loaded.texts[i][j] == s.text
            assert loaded.finish_reasons[i][j] == s.finish_reason
            assert loaded.token_ids[i][j].dtype == np.int32
            assert loaded.logprobs[i][j].dtype == np.float32
            np.testing.assert_array_equal(loaded.token_ids[i][j], s.token_ids)
            np.testing.assert_array_equal(loaded.logprobs[i][j], s.logprobs)  # bit exact
    # A saved SampleSet saves and loads to the same thing again.
    save_samples(str(tmp_path / "again"), loaded.prompts, loaded)
    again = load_samples(str(tmp_path / "again"))
    assert (again.prompts, again.prompt_token_ids, again.texts, again.finish_reasons) == (
        loaded.prompts, loaded.prompt_token_ids, loaded.texts, loaded.finish_reasons)
    for row_a, row_b in zip(again.logprobs, loaded.logprobs):
        for a, b in zip(row_a, row_b):
            np.testing.assert_array_equal(a, b)
    from datasets import load_dataset

    ds = load_dataset("json", data_files=os.path.join(run["folder"], SAMPLES_JSONL),
                      split="train")
    assert len(ds) == 16 and ds[5]["prompt_index"] == 1 and ds[5]["sample_index"] == 1
    assert ds[5]["num_tokens"] == result.samples[1][1].length
    assert ds[5]["response"] == result.samples[1][1].text


def _corrupt(src, dst, name, how):
    shutil.copytree(src, dst)
    path = os.path.join(dst, name)
    if how == "delete":
        os.remove(path)
    else:
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:len(data) * 2 // 3])
    return str(dst)


@pytest.mark.parametrize("name,how,message", [
    (SAMPLES_NPZ, "truncate", "samples.npz: corrupt or truncated"),
    (SAMPLES_NPZ, "delete", "samples.npz: missing"),
    (SAMPLES_JSONL, "truncate", "samples.jsonl:"),
    (SAMPLES_JSONL, "delete", "samples.jsonl: missing"),
    (SAMPLES_META, "truncate", "samples_meta.json: not valid JSON"),
])
def test_store_bad_files(run, tmp_path, name, how, message):
    """(d) A truncated or missing file is a DiceError naming that file."""
    folder = _corrupt(run["folder"], tmp_path / "bad", name, how)
    with pytest.raises(DiceError, match=message.replace(".", r"\.")):
        load_samples(folder)


def test_store_inconsistent_rows(run, tmp_path):
    folder = str(shutil.copytree(run["folder"], tmp_path / "bad"))
    path = os.path.join(folder, SAMPLES_JSONL)
    rows = [json.loads(line) for line in open(path)]
    rows[3]["num_tokens"] += 1
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with pytest.raises(DiceError, match="line 4 has num_tokens"):
        load_samples(folder)
    with pytest.raises(DiceError, match="no such samples folder"):
        load_samples(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("scale", ["beta", "none"])
def test_scored_samples_feed_the_round_builder(run, scale):
    """(e) The implicit reward of every sample is beta * (log pi - log pi_ref), or the
    official unscaled difference, from the two direct forwards."""
    samples, config = run["samples"], run["config"]
    scored = score_samples(samples, config, run["reference"], progress=False)
    offline = [{"prompt": f"offline {i}", "chosen": "good", "rejected": "bad"}
               for i in range(8)]
    cfg = DiceDataConfig(beta=0.1, reward_scale=scale, gamma=0.5,
                         filters=FilterConfig(drop_truncated=False, min_chars=-1, min_valid=2),
                         search=AlphaSearchConfig(method="grid", objective="abs_mean",
                                                  grid_step=1e-3, alpha_max=0.01))
    data = build_round_data(scored, offline, cfg)
    diff = sums(run["direct_policy"]) - sums(run["direct_reference"])
    want = 0.1 * diff if scale == "beta" else diff
    # Difference of two sequence log-probs, each within 1e-4 (see above): 2e-4.
    np.testing.assert_allclose(data.reward, want, atol=2e-4, rtol=0)
    for row in data.samples:
        i, k = row["prompt_index"], row["sample_index"]
        assert row["num_tokens"] == len(samples.token_ids[i][k])
        assert abs(row["reward"] - want[i, k]) <= 2e-4
    assert data.pairs and data.stats["num_prompts"] == len(PROMPTS)


def test_score_inputs_are_checked(run):
    samples, config = run["samples"], run["config"]
    bad = dataclasses.replace(samples, prompt_token_ids=[[], *samples.prompt_token_ids[1:]])
    with pytest.raises(DiceError, match="row 0: empty prompt"):
        score_samples(bad, config, run["reference"], progress=False)
    short = dataclasses.replace(samples, logprobs=[[*row[:-1], row[-1][:-1]]
                                                   for row in samples.logprobs])
    with pytest.raises(DiceError, match="log-probs"):
        score_samples(short, config, run["reference"], progress=False)
    ids = dataclasses.replace(samples, prompts=[[5, 6], *samples.prompts[1:]])
    with pytest.raises(DiceError, match="prompt 0: expected a string"):
        score_samples(ids, config, run["reference"], progress=False)
    # Multi-device callers place params themselves; a host copy scores the same.
    host = jax.device_get(run["reference"])
    a = score_samples(samples, config, host, progress=False).logp_reference
    b = score_samples(samples, config, run["reference"], progress=False).logp_reference
    np.testing.assert_array_equal(a, b)
