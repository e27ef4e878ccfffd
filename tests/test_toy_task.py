"""The controlled task (dice_jax.toy): its gold reward, its data sources, and DICE on it.

The checkers and the gold reward are compared with an independent integer computation
over every string of a small alphabet; the data sources with their labelling rule. The
end-to-end case runs configs/toy.py (warm-up, round 0 on gold-labelled pairs, one DICE
round) in this process and checks the premise and the promise of DICE where the truth
is known: after round 0 the implicit reward ranks fresh samples like the gold reward
(accuracy >= 0.7), and one DICE round raises the mean gold reward of fresh samples.
"""

import importlib.util
import itertools
import json
import math
import os
import random

import numpy as np
import pytest

from dice_jax.data import load_eval_prompts, load_preference_data, normalise_row
from dice_jax.errors import DiceError
from dice_jax.judge.prompts import build_instruction, make_row
from dice_jax.judge.score import score_response
from dice_jax.toy import language
from dice_jax.toy.probe import pairwise_accuracy

REPO = os.path.join(os.path.dirname(__file__), os.pardir)


def independent_gold(text: str) -> float:
    """The gold reward from its definition, in integers (docs/toy_task.md)."""
    if not text.strip():
        return 0.0
    favoured = sum(ch in "ab" for ch in text)
    n = len(text)
    rules = (2 * favoured >= n, 4 * favoured >= 3 * n, 6 <= n <= 10, text.endswith("!"))
    return sum(rules) / 4


def all_strings(alphabet: str, max_len: int):
    for n in range(max_len + 1):
        for chars in itertools.product(alphabet, repeat=n):
            yield "".join(chars)


# ---------------------------------------------------------------------- gold reward
def test_gold_reward_matches_its_definition_on_every_short_string():
    # Every string of up to 7 characters over a, c, !, x, plus longer ones (the length
    # band's upper edge): the judge's score equals the integer definition.
    strings = [*all_strings("ac!x", 7), *("ab" * k + "!" for k in range(8)),
               *("a" * k for k in range(9, 13)), "ccccccccc!", " ab ", "ab\n!"]
    row = language.prompt_row("eval", 3)
    for text in strings:
        assert score_response(row, text).score == independent_gold(text), text
        assert language.gold_reward(text) == independent_gold(text), text


def test_each_checker_against_brute_force():
    for text in all_strings("abc!", 6):
        n = len(text)
        share = sum(ch in "ab" for ch in text)
        for min_share in (0.0, 0.25, 0.5, 0.75, 1.0):
            inst, _ = build_instruction("toy:letter_share",
                                        {"letters": "ab", "min_share": min_share})
            assert inst.check_following(text) == (n > 0 and share >= min_share * n), text
        inst, _ = build_instruction("toy:length_band", {"min_chars": 2, "max_chars": 4})
        assert inst.check_following(text) == (2 <= n <= 4)
        inst, _ = build_instruction("toy:end_marker", {"marker": "c!"})
        assert inst.check_following(text) == (n >= 2 and text[-2:] == "c!")


def test_toy_instructions_behave_like_registry_ones():
    # make_row checks that the kwargs rebuild each description (IFEval's round trip).
    ids = [iid for iid, _ in language.GOLD_RULES]
    kwargs = [args for _, args in language.GOLD_RULES]
    row = make_row("r", "toy task", ids, kwargs)
    assert row["prompt"].startswith("toy task ") and "end with !" in row["prompt"]
    assert language.describe_rules() == ("50%+ of chars in ab; 75%+ of chars in ab; "
                                         "6-10 chars; end with !")
    assert score_response(row, "").score == 0.0  # empty: follows nothing
    assert score_response(row, "abab!").followed == (True, True, False, True)
    with pytest.raises(DiceError, match="unknown instruction id 'toy:nope'"):
        build_instruction("toy:nope", {})
    with pytest.raises(DiceError, match="toy:length_band: cannot build"):
        build_instruction("toy:length_band", {"min_chars": 5, "max_chars": 2})
    with pytest.raises(DiceError, match="toy:letter_share: cannot build"):
        build_instruction("toy:letter_share", {"letters": "ab"})


def test_base_distribution_mean_gold_by_enumeration():
    # Exact expectation over (length, number of favoured letters, marker) ...
    exact = 0.0
    for n in range(1, language.MAX_LETTERS + 1):
        for k in range(n + 1):
            p = math.comb(n, k) * 0.5 ** n / language.MAX_LETTERS
            for marker in ("", "!"):
                exact += p * 0.5 * independent_gold("a" * k + "c" * (n - k) + marker)
    assert exact == pytest.approx(0.3787, abs=1e-4)  # the figure docs/toy_task.md gives
    # ... and the sampler of the base distribution agrees with it.
    rng = random.Random(0)
    drawn = [language.base_response(rng) for _ in range(20000)]
    assert np.mean([independent_gold(t) for t in drawn]) == pytest.approx(exact, abs=0.01)
    assert set("".join(drawn)) == set("abcd!")


# ---------------------------------------------------------------------- data sources
def test_toy_pairs_are_labelled_by_the_gold_reward():
    rows = load_preference_data("toy:64", seed=3)
    assert len(rows) == 64 and len({r["prompt"] for r in rows}) == 64
    for i, row in enumerate(rows):
        assert normalise_row(row, i) == row
        assert row["instruction_ids"] == [iid for iid, _ in language.GOLD_RULES]
        scores = [independent_gold(t) for t in (row["chosen"], row["rejected"])]
        assert scores == [row["chosen_score"], row["rejected_score"]]
        assert scores[0] > scores[1]
        assert row["chosen_score"] == max(row["scores"])
        assert row["rejected_score"] == min(row["scores"])
    assert load_preference_data("toy:64", seed=3) == rows  # seeded
    assert load_preference_data("toy:64", seed=4) != rows
    assert load_preference_data("toy:8", seed=3) == rows[:8]  # a prefix
    for bad in ("toy:0", "toy:x"):
        with pytest.raises(DiceError, match="expected toy:N"):
            load_preference_data(bad)


def test_toy_eval_prompts():
    rows = load_eval_prompts("toy:eval", 5)
    train = {r["prompt"] for r in load_preference_data("toy:64")}
    assert [r["id"] for r in rows] == [f"toy-eval-0000{i}" for i in range(5)]
    assert not {r["prompt"] for r in rows} & train
    assert all(score_response(r, "abab ab!").score == 1.0 for r in rows)
    with pytest.raises(DiceError, match="unknown toy prompt set"):
        load_eval_prompts("toy:dev", 5)
    with pytest.raises(DiceError, match="number of prompts is required"):
        load_eval_prompts("toy:eval")


def test_pairwise_accuracy_against_brute_force():
    rng = np.random.default_rng(0)
    reward = rng.integers(0, 3, (5, 4)).astype(float)
    gold = rng.integers(0, 3, (5, 4)).astype(float)
    right = total = 0
    for p in range(5):
        for i in range(4):
            for j in range(4):
                if gold[p, i] > gold[p, j]:
                    total += 1
                    right += reward[p, i] > reward[p, j]
    assert pairwise_accuracy(reward, gold) == (right / total, total)
    assert pairwise_accuracy(np.zeros((2, 3)), np.ones((2, 3))) == (None, 0)


def test_warmup_source_names():
    from dice_jax.toy.warmup import WarmupSettings, parse_source

    assert parse_source("tiny") == WarmupSettings("tiny", 0)
    assert parse_source("tiny:2") == WarmupSettings("tiny", 2)
    assert WarmupSettings(steps=10).key() != WarmupSettings().key()
    with pytest.raises(DiceError, match="toy:PRESET"):
        parse_source("tiny:x")


# ---------------------------------------------------------------------- DICE on it
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """configs/toy.py with one DICE round, no eval stages, run in this process; the
    warm-up cached in a fresh folder (so it is built here, as on a first run)."""
    import jax

    from dice_jax.config import validate
    from dice_jax.run.loop import DiceRun

    root = tmp_path_factory.mktemp("toy")
    saved = os.environ.get("DICE_JAX_TOY_CACHE")
    os.environ["DICE_JAX_TOY_CACHE"] = str(root / "cache")
    spec = importlib.util.spec_from_file_location("toy_config",
                                                  os.path.join(REPO, "configs", "toy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.run_dir, config.rounds, config.eval.enabled = str(root / "run"), 1, False
    try:
        run = DiceRun(validate(config, jax.device_count()), progress=False)
        run.run()
        yield run
    finally:
        if saved is None:
            os.environ.pop("DICE_JAX_TOY_CACHE", None)
        else:
            os.environ["DICE_JAX_TOY_CACHE"] = saved


def test_dice_round_on_the_toy_task(toy_run):
    from dice_jax.toy.probe import probe_run

    probes = probe_run(toy_run, language.eval_rows("eval", 64), num_samples=8)
    start, zero, one = probes["start"], probes["round 0"], probes["round 1"]
    # The warmed-up start model writes the language with about the base distribution's
    # gold reward; round 0's DPO on gold-labelled pairs raises it.
    assert 0.25 < start.gold < 0.5
    assert zero.gold > start.gold + 0.05
    # The premise: after round 0 the implicit reward ranks fresh samples like the gold.
    assert zero.accuracy >= 0.7 and zero.pairs > 500
    # The promise: one DICE round (trained on self-labelled pairs) raises the gold reward.
    assert one.gold > zero.gold + 0.03
    # The data stage measured the reward against the toy judge on the round's samples.
    with open(os.path.join(toy_run.folder.root, "round_1", "data", "stats.json")) as f:
        health = json.load(f)["reward_health"]
    assert health["judge_rank_agreement"]["prompts"] > 0
    assert health["judge_pair_agreement"]["agree"] > health["judge_pair_agreement"][
        "disagree"]
