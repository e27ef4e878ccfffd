"""The round's data builder end to end on synthetic scored samples, and its artifacts."""

import json
import os
from collections import Counter

import numpy as np
import pytest

from dice_jax.dice.alpha_search import AlphaSearchConfig
from dice_jax.dice.artifacts import MIXED_FILE, PAIRS_FILE, SAMPLES_FILE, write_round_data
from dice_jax.dice.builder import DiceDataConfig, ScoredSamples, build_round_data
from dice_jax.dice.filters import FilterConfig
from dice_jax.errors import DiceError


def _samples(p=12, k=6, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(10, 400, size=(p, k))
    responses = [["x" * int(n) for n in row] for row in lengths]
    # Longer responses get higher implicit reward: the verbosity bias DICE removes.
    logp_ref = rng.normal(-100, 5, size=(p, k))
    logp_pi = logp_ref + 0.05 * lengths + rng.normal(0, 3, size=(p, k))
    finish = [["stop"] * k for _ in range(p)]
    finish[0][0] = "length"
    return ScoredSamples([f"prompt {i}" for i in range(p)], responses, lengths + 1, finish,
                         logp_pi, logp_ref)


def _config(**kw):
    base = dict(beta=0.1, gamma=0.5, filters=FilterConfig(min_valid=3),
                search=AlphaSearchConfig(method="grid", objective="abs_mean", grid_step=1e-4,
                                         alpha_max=0.05))
    base.update(kw)
    return DiceDataConfig(**base)


OFFLINE = [{"prompt": f"prompt {i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
           for i in range(40)]


def test_rewards_pairs_and_mix():
    s = _samples()
    data = build_round_data(s, OFFLINE, _config())
    reward = 0.1 * (s.logp_policy - s.logp_reference)
    # The builder works in float32: log-probs near -100 round by ~4e-6, times beta 0.1.
    np.testing.assert_allclose(data.reward, reward, atol=1e-5)
    assert data.stats["drops"]["truncated"] == 1
    assert not data.valid[0, 0]
    alpha = data.search.alpha
    for pair in data.pairs:  # chosen/rejected are argmax/argmin of r - alpha*|y| (numpy)
        i = pair["prompt_index"]
        shaped = np.where(data.valid[i], reward[i] - alpha * data.lengths[i], np.nan)
        assert pair["chosen_index"] == np.nanargmax(shaped)
        assert pair["rejected_index"] == np.nanargmin(shaped)
        assert pair["chosen"] == s.responses[i][pair["chosen_index"]]
    # Shaping removed most of the verbosity gap.
    assert data.stats["mean_length_gap_before"] > 100
    assert abs(data.stats["mean_length_gap_after"]) < data.stats["mean_length_gap_before"] / 2
    assert data.stats["replay"]["num_generated"] == len([r for r in data.mixed
                                                         if r["source"] == "generated"])


def test_unscaled_rewards_follow_official_convention():
    s = _samples()
    scaled = build_round_data(s, OFFLINE, _config())
    official = build_round_data(s, OFFLINE, _config(
        reward_scale="none", search=AlphaSearchConfig(
            method="grid", objective="abs_mean", grid_step=1e-3, alpha_max=0.5)))
    # Unscaled: the two float32 roundings of log-probs near -100 (~8e-6 each) remain; 1e-4.
    np.testing.assert_allclose(official.reward, s.logp_policy - s.logp_reference, atol=1e-4)
    # The same shaping on the official scale: alpha* is larger by 1/beta.
    # Both grid searches land in the same flat minimum of a piecewise-constant objective, on
    # grids of different resolution: allow 2 official grid steps plus 20% for its width.
    assert official.search.alpha == pytest.approx(scaled.search.alpha * 10, rel=0.2, abs=2e-3)


def test_artifacts_load_with_datasets(tmp_path):
    from datasets import load_dataset

    data = build_round_data(_samples(), OFFLINE, _config())
    out = write_round_data(data, str(tmp_path / "round_1" / "data"))
    for name in (SAMPLES_FILE, PAIRS_FILE, MIXED_FILE):
        ds = load_dataset("json", data_files=os.path.join(out, name), split="train")
        assert len(ds) > 0
    mixed = load_dataset("json", data_files=os.path.join(out, MIXED_FILE), split="train")
    assert {"prompt", "chosen", "rejected", "source"} <= set(mixed.column_names)
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["alpha_star"] == data.search.alpha and len(stats["alpha_trace"]) > 1
    for png in ("length_gap.png", "alpha_search.png"):
        assert open(os.path.join(out, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs():
    s = _samples()
    with pytest.raises(DiceError, match="gamma"):
        _config(gamma=1.5)
    one = ScoredSamples(s.prompts, [r[:1] for r in s.responses], s.token_counts[:, :1],
                        [r[:1] for r in s.finish_reasons], s.logp_policy[:, :1],
                        s.logp_reference[:, :1])
    with pytest.raises(DiceError, match="at least 2"):
        build_round_data(one, OFFLINE, _config())
    all_long = ScoredSamples(s.prompts, s.responses, s.token_counts,
                             [["length"] * 6 for _ in s.prompts], s.logp_policy,
                             s.logp_reference)
    with pytest.raises(DiceError, match="every response was filtered out"):
        build_round_data(all_long, OFFLINE, _config())
    with pytest.raises(DiceError, match="row 3 has no 'chosen'"):
        build_round_data(s, [*OFFLINE[:3], {"prompt": "p", "rejected": "r"}], _config())
    nan = ScoredSamples(s.prompts, s.responses, s.token_counts, s.finish_reasons,
                        np.where(np.eye(12, 6, dtype=bool), np.nan, s.logp_policy),
                        s.logp_reference)
    data = build_round_data(nan, OFFLINE, _config())
    assert data.stats["drops"]["non_finite_reward"] == 5  # (0, 0) was already truncated


def test_nothing_half_written(tmp_path, monkeypatch):
    from dice_jax.dice import artifacts

    data = build_round_data(_samples(), OFFLINE, _config())

    def boom(*a, **k):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(artifacts, "plot_alpha_landscape", boom)
    with pytest.raises(RuntimeError):
        write_round_data(data, str(tmp_path / "data"))
    assert os.listdir(tmp_path) == []


def test_llm_judge_scores_replace_reward_without_shaping():
    from dice_jax.dice.llm_judge import judge_prompt, judge_scores, parse_judge_score

    assert parse_judge_score("Solid answer.\nScore: 4") == 4.0
    assert parse_judge_score("Score: 2 ... on reflection Score: **3**") == 3.0
    assert parse_judge_score("I give it five points") is None
    assert parse_judge_score("Score: 7") is None  # outside 0-5
    assert "User: Why?\n<response>Because.</response>" in judge_prompt("Why?", "Because.")
    s = _samples(p=3, k=4)
    texts = [[["Score: 1"], ["Score: 5"], ["Score: 3", "Score: 4"], ["no idea"]],
             [["Score: 2"]] * 4,
             [["Score: 0"], ["bad"], ["Score: 5"], ["Score: 5"]]]
    scores, drops = judge_scores(texts)
    assert drops == {"unparseable_judgement": 2, "unparseable_score": 2}
    # Small integers and halves are exact in float; the default rtol (1e-7) only spares repr.
    np.testing.assert_allclose(scores[0, :3], [1, 5, 3.5])
    data = build_round_data(s, OFFLINE, _config(filters=FilterConfig(min_valid=2)),
                            judge_scores=scores, judge_drops=drops)
    assert data.search.alpha == 0.0
    by_prompt = {p["prompt_index"]: p for p in data.pairs}
    # (0, 0) is truncated (see _samples), so the worst valid response is index 2.
    assert (by_prompt[0]["chosen_index"], by_prompt[0]["rejected_index"]) == (1, 2)
    assert 1 not in by_prompt  # all four scores tie
    assert (by_prompt[2]["chosen_index"], by_prompt[2]["rejected_index"]) == (2, 0)
    assert data.stats["drops"]["tied_prompts"] == 1
    # Each unscored response counted once: (0, 3) and (2, 1), both kept by the filters.
    assert data.stats["drops"]["unparseable_score"] == 2
    assert data.stats["drops"]["unparseable_judgement"] == 2
    nothing = np.full((3, 4), np.nan, np.float32)
    with pytest.raises(DiceError, match="no parseable 'Score: N'"):
        build_round_data(s, OFFLINE, _config(), judge_scores=nothing,
                         judge_drops=Counter(unparseable_judgement=12, unparseable_score=12))
