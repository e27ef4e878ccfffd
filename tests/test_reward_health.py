"""The implicit reward's health figures and the guard (`dice_jax.dice.diagnostics`).

Each figure is checked against a brute-force computation written out here; the run-level
tests check that the tiny run's held-out accuracy is the DPO trainer's own held-out
evaluation of round 0 (the same models, another code path), and that a reward that ranks
the held-out pairs backwards stops the round, which then resumes on D_offline.
"""

import itertools
import json
import os

import numpy as np
import pytest
from helpers import train_tiny

from dice_jax.dice.diagnostics import (
    GuardConfig,
    heldout_accuracy,
    length_correlation,
    pair_agreement,
    rank_agreement,
)
from dice_jax.errors import ConfigError


def _tau_b(x, y):
    """Kendall's tau-b by counting every pair."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif dx == dy:
            concordant += 1
        else:
            discordant += 1
    return (concordant - discordant) / np.sqrt(
        (concordant + discordant + ties_x) * (concordant + discordant + ties_y))


def test_rank_agreement_is_the_mean_per_prompt_tau_b():
    rng = np.random.default_rng(0)
    reward = rng.normal(size=(6, 5))
    gold = rng.integers(0, 3, size=(6, 5)).astype(float)  # ties, as the judge has
    gold[2] = 1.0                                            # no variation: skipped
    valid = rng.random((6, 5)) > 0.2
    valid[4] = [True, False, False, False, False]            # one valid sample: skipped
    expected = []
    for r, g, ok in zip(reward, gold, valid):
        if ok.sum() >= 2 and len(set(g[ok])) > 1 and len(set(r[ok])) > 1:
            expected.append(_tau_b(r[ok], g[ok]))
    got = rank_agreement(reward, gold, valid)
    assert got["prompts"] == len(expected) >= 3
    assert got["kendall_tau"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert rank_agreement(reward, np.ones_like(gold), valid) == {"kendall_tau": None,
                                                               "prompts": 0}


def test_pair_agreement_counts_the_judges_verdict_on_each_pair():
    gold = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    chosen, rejected = np.array([0, 0, 0, 1]), np.array([1, 1, 1, 2])
    is_pair = np.array([True, True, True, False])
    got = pair_agreement(gold, chosen, rejected, is_pair)
    assert got == {"agree": pytest.approx(1 / 3), "disagree": pytest.approx(1 / 3),
                   "tie": pytest.approx(1 / 3), "pairs": 3}


def test_length_correlation_is_pearson_within_prompts():
    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 400, size=(8, 4)).astype(float)
    reward = 0.01 * lengths + rng.normal(size=(8, 4)) + 5 * np.arange(8)[:, None]
    valid = rng.random((8, 4)) > 0.25
    xs, ys = [], []
    for r, n, ok in zip(reward, lengths, valid):
        if ok.any():
            xs += list(r[ok] - r[ok].mean())
            ys += list(n[ok] - n[ok].mean())
    expected = np.corrcoef(xs, ys)[0, 1]  # prompt offsets removed: only the length signal
    assert length_correlation(reward, lengths, valid) == pytest.approx(expected, abs=1e-12)
    assert length_correlation(np.zeros((2, 3)), lengths[:2, :3], valid[:2, :3]) is None


def test_heldout_accuracy_is_eq4_on_each_pair():
    policy = np.array([[-10.0, -12.0], [-5.0, -4.0], [-7.0, -7.0]])
    reference = np.array([[-11.0, -11.0], [-5.0, -5.0], [-6.0, -6.0]])
    got = heldout_accuracy(policy, reference, scale=0.1)
    margins = [0.1 * ((-10 + 11) - (-12 + 11)), 0.1 * ((-5 + 5) - (-4 + 5)), 0.0]
    assert got == {"accuracy": pytest.approx(1 / 3), "margin": pytest.approx(np.mean(margins)),
                   "pairs": 3}  # the tie (third pair) counts as wrong


def test_guard_settings():
    assert GuardConfig().tripped(0.49) and not GuardConfig().tripped(0.5)
    assert not GuardConfig(min_heldout_accuracy=0.0).tripped(0.0)
    assert not GuardConfig().tripped(None)
    with pytest.raises(ConfigError, match=r"dice\.guard\.action"):
        GuardConfig(action="retry")
    with pytest.raises(ConfigError, match=r"dice\.guard\.min_heldout_accuracy"):
        GuardConfig(min_heldout_accuracy=1.5)


# ---------------------------------------------------------------------- whole runs
def test_tiny_run_heldout_accuracy_is_the_trainers_evaluation_of_round_0(tiny_run):
    run_dir = tiny_run  # the session's configs/tiny.py run (conftest)
    with open(os.path.join(run_dir, "round_1", "data", "stats.json")) as f:
        health = json.load(f)["reward_health"]
    with open(os.path.join(run_dir, "round_0", "train", "metrics.jsonl")) as f:
        final = [json.loads(line) for line in f if "eval/loss" in line][-1]
    # Round 1 labels with (pi_theta(0), pi_ref(0)); round 0's trainer evaluated exactly that
    # pair of models on the same held-out split at its last step.
    assert final["step"] == 4 and health["heldout_pairs"] == 8
    assert health["heldout_implicit_accuracy"] == final["eval/rewards/accuracies"]
    assert health["heldout_margin"] == pytest.approx(final["eval/rewards/margins"], rel=1e-5)
    assert -1 <= health["length_correlation_raw"] <= 1
    with open(os.path.join(run_dir, "manifest.json")) as f:
        info = json.load(f)["stages"]["round_1/data"]
    assert info["heldout_implicit_accuracy"] == final["eval/rewards/accuracies"]
    assert info["guard_action"] == "none"


def test_a_reward_below_the_guard_stops_and_resumes_on_d_offline(tmp_path):
    from dice_jax.data import synthetic_preferences
    from dice_jax.run.stages import holdout_split

    # Round 0 learns "plain beats rambling" from the training pairs; the held-out pairs
    # (the split round 0 holds out: seed 0 -> round seed 0) say the opposite, so the
    # implicit reward ranks them backwards.
    rows = synthetic_preferences(48, 0)
    held = {json.dumps(r, sort_keys=True) for r in holdout_split(rows, 8, 0)[1]}
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for r in rows:
            if json.dumps(r, sort_keys=True) in held:
                r = dict(r, chosen=r["rejected"], rejected=r["chosen"])
            f.write(json.dumps(r) + "\n")
    run_dir = str(tmp_path / "run")
    common = (f"--config.data.offline={path}", "--config.rounds=1",
              "--config.eval.enabled=false")
    proc = train_tiny(run_dir, *common, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: round 1: the implicit reward ranks 0.000 of 8 held-out")
    assert "dice.guard.min_heldout_accuracy=0.5" in line
    assert not os.path.exists(os.path.join(run_dir, "round_1", "data"))
    train_tiny(run_dir, *common, "--config.dice.guard.action=offline")
    with open(os.path.join(run_dir, "manifest.json")) as f:
        stages = json.load(f)["stages"]
    assert stages["round_1/data"]["guard_action"] == "offline"
    assert "round_1/train" in stages and "export" in stages
    with open(os.path.join(run_dir, "round_1", "data", "mixed.jsonl")) as f:
        mixed = [json.loads(line) for line in f]
    # D_1 is D_offline without its held-out pairs (the synthetic prompts are distinct).
    assert len(mixed) == 40 and {r["source"] for r in mixed} == {"offline"}
    assert not {r["prompt"] for r in mixed} & {json.loads(h)["prompt"] for h in held}


def test_gold_scores_are_the_judges_verdicts_recorded_with_the_builtin_pairs():
    from dice_jax.data import load_preference_data
    from dice_jax.dice.builder import ScoredSamples
    from dice_jax.run.stages import gold_scores

    rows = load_preference_data("builtin:smollm2", max_rows=6, seed=0)
    texts = [[r["chosen"], r["rejected"]] for r in rows]
    scored = ScoredSamples(prompts=[r["prompt"] for r in rows] + ["a prompt with no judge"],
                           responses=[*texts, ["x", "y"]], token_counts=np.ones((7, 2)),
                           finish_reasons=[["stop", "stop"]] * 7,
                           logp_policy=np.zeros((7, 2)), logp_reference=np.zeros((7, 2)))
    gold = gold_scores(scored, rows)
    # The data file records the judge's scores of its chosen and rejected responses.
    np.testing.assert_allclose(gold[:6], [[r["chosen_score"], r["rejected_score"]]
                                          for r in rows])
    assert np.isnan(gold[6]).all()
    assert gold_scores(scored, [{"prompt": r["prompt"]} for r in rows]) is None


def test_offline_baselines_hold_out_round_0s_pairs_every_round(tmp_path):
    from dice_jax.data import synthetic_preferences
    from dice_jax.run.stages import holdout_split, rows_digest

    rows = synthetic_preferences(48, 0)
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    run_dir = str(tmp_path / "run")
    train_tiny(run_dir, f"--config.data.offline={path}", "--config.method=offline_dpo",
               "--config.rounds=2", "--config.eval.enabled=false")
    with open(os.path.join(run_dir, "manifest.json")) as f:
        stages = json.load(f)["stages"]
    # Round t trains with seed round_seed(t); the split must still be round 0's (seed 0).
    held = rows_digest(holdout_split(rows, 8, 0)[1])
    assert held != rows_digest(holdout_split(rows, 8, 1)[1])
    for t in (0, 1, 2):
        info = stages[f"round_{t}/train"]
        assert (info["train_pairs"], info["eval_pairs"]) == (40, 8)
        assert info["heldout_digest"] == held
