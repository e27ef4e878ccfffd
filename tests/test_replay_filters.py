"""Replay sizes and prompt-disjointness (official formulas) and response filters."""

import numpy as np
import pytest

from dice_jax.dice.filters import FilterConfig, valid_responses
from dice_jax.dice.replay import mix_replay, replay_sizes


def _rows(prefix, n, prompts=None):
    return [{"prompt": f"{prompts[i] if prompts else prefix + str(i)}", "chosen": "c",
             "rejected": "r"} for i in range(n)]


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0])
def test_replay_sizes_and_disjoint_prompts(gamma):
    offline = _rows("q", 100)
    generated = _rows("q", 80)  # same prompt set as offline rows 0..79
    mix = mix_replay(generated, offline, gamma, seed=0)
    n_off = len(offline)
    expect_gen = 0 if gamma == 1 else min(int(n_off * (1 - gamma)), len(generated))
    expect_off = n_off if gamma == 1 else int(gamma * expect_gen / (1 - gamma))
    assert mix.num_generated == expect_gen
    assert mix.num_offline + mix.offline_shortfall == expect_off
    gen_prompts = {r["prompt"] for r in mix.rows if r["source"] == "generated"}
    off_prompts = {r["prompt"] for r in mix.rows if r["source"] == "offline"}
    assert not gen_prompts & off_prompts
    assert len(mix.rows) == mix.num_generated + mix.num_offline
    assert mix_replay(generated, offline, gamma, seed=0) == mix
    if 0 < gamma < 1:
        assert mix_replay(generated, offline, gamma, seed=1).rows != mix.rows


def test_replay_sizes_examples():
    # The official formulas, worked by hand.
    assert replay_sizes(10000, 9000, 0.5) == (5000, 5000)
    assert replay_sizes(10000, 3000, 0.5) == (3000, 3000)
    assert replay_sizes(10000, 9000, 0.1) == (9000, 1000)
    assert replay_sizes(10000, 9000, 0.0) == (9000, 0)
    assert replay_sizes(10000, 9000, 1.0) == (0, 10000)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="gamma"):
            replay_sizes(10, 10, bad)


def test_offline_missing_column_is_named():
    with pytest.raises(KeyError, match="offline row 1 has no 'rejected'"):
        mix_replay(_rows("g", 2), [{"prompt": "a", "chosen": "x", "rejected": "y"},
                                   {"prompt": "b", "chosen": "x"}], 0.5, seed=0)


def test_filters_count_every_drop():
    lengths = np.array([[10, 2, 7000, 50], [3, 4, 5, 6], [100, 200, 300, 400]])
    finish = [["stop", "stop", "stop", "length"], ["stop"] * 4, ["stop"] * 4]
    valid, kept, drops = valid_responses(finish, lengths, FilterConfig(min_valid=2))
    assert drops == {"truncated": 1, "too_short": 2, "too_long": 1, "too_few_valid": 1}
    assert kept.tolist() == [False, True, True]
    assert valid.tolist() == [[False] * 4, [False, True, True, True], [True] * 4]
    with pytest.raises(ValueError, match="min_valid"):
        FilterConfig(min_valid=1)
