"""The verifiable judge: base tasks, seeded prompt sets and splits, JSONL io and CLI, gold
scores and their aggregates, preference labelling."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys

import pytest
from if_verifiable.ifeval import instructions, instructions_registry

from dice_jax.errors import DiceError
from dice_jax.judge import prompts as P
from dice_jax.judge import score as S
from dice_jax.judge.tasks import BASE_TASKS, KINDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def train_rows():
    return P.generate_prompts("train", 400, seed=3)


@pytest.fixture(scope="module")
def eval_rows():
    return P.generate_prompts("eval", 200, seed=4)


# --- base tasks and splits -------------------------------------------------------------------

def test_base_tasks_are_many_distinct_single_requests():
    texts = [t for _, t in BASE_TASKS]
    assert len(texts) >= 120 and len(set(texts)) == len(texts)
    assert {k for k, _ in BASE_TASKS} == set(KINDS)
    for text in texts:
        assert text[-1] in ".?" and text.count(".") + text.count("?") == 1, text
        assert len(text) < 100


def test_splits_partition_the_tasks():
    train, eval_ = P.split_tasks("train"), P.split_tasks("eval")
    assert not set(train) & set(eval_)
    assert sorted(train + eval_) == sorted(BASE_TASKS)
    assert len(eval_) == round(len(BASE_TASKS) * P.DEFAULT_EVAL_FRACTION)
    assert P.split_tasks("eval", split_seed=1) != eval_  # the partition is seeded
    with pytest.raises(DiceError):
        P.split_tasks("test")
    with pytest.raises(DiceError):
        P.split_tasks("eval", eval_fraction=1.0)


def test_sets_with_any_seeds_share_no_base_task(train_rows, eval_rows):
    other_eval = P.generate_prompts("eval", 100, seed=99)
    train_tasks = {r["base_task"] for r in train_rows}
    assert not train_tasks & {r["base_task"] for r in eval_rows + other_eval}
    assert train_tasks == {t for _, t in P.split_tasks("train")}  # 400 rows use every task


# --- generated rows ---------------------------------------------------------------------------

def test_rows_are_well_formed(train_rows, eval_rows):
    rows = train_rows + eval_rows
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["prompt"] for r in train_rows}) == len(train_rows)
    counts = {len(r["instruction_ids"]) for r in rows}
    assert counts == {1, 2, 3}
    kinds = dict((t, k) for k, t in BASE_TASKS)
    for r in rows:
        assert list(r) == list(P.ROW_KEYS)
        assert set(r["instruction_ids"]) <= set(P.SUPPORTED_INSTRUCTIONS)
        assert len(r["instruction_ids"]) == len(set(r["instruction_ids"])) == len(r["kwargs"])
        # the stored kwargs rebuild exactly the descriptions in the prompt
        descriptions = [P.build_instruction(i, a)[1]
                        for i, a in zip(r["instruction_ids"], r["kwargs"])]
        assert r["prompt"] == P.join_descriptions(r["base_task"], descriptions)
        assert r["prompt"].startswith(r["base_task"] + " ")
        if "detectable_format:constrained_response" in r["instruction_ids"]:
            assert kinds[r["base_task"]] == "question"
    used = {i for r in rows for i in r["instruction_ids"]}
    assert used >= set(P.SUPPORTED_INSTRUCTIONS) - {"detectable_format:constrained_response"}


def test_instructions_respect_the_registry_conflicts(train_rows, eval_rows):
    conflicts = instructions_registry.INSTRUCTION_CONFLICTS
    for r in train_rows + eval_rows:
        for a, b in itertools.combinations(r["instruction_ids"], 2):
            assert b not in conflicts[a] and a not in conflicts[b], r["instruction_ids"]
            assert (a, b) not in P.EXTRA_CONFLICTS and (b, a) not in P.EXTRA_CONFLICTS


def test_generation_is_deterministic_and_seeded(train_rows):
    state = random.getstate()
    random.seed(12345)  # the global random module must not matter ...
    again = P.generate_prompts("train", 400, seed=3)
    assert again == train_rows
    assert random.random() == random.Random(12345).random()  # ... nor be consumed
    random.setstate(state)
    assert P.generate_prompts("train", 50, seed=3) == train_rows[:50]  # prefix of a longer set
    other = P.generate_prompts("train", 400, seed=4)
    assert [r["prompt"] for r in other] != [r["prompt"] for r in train_rows]
    assert sum(a["prompt"] == b["prompt"] for a, b in zip(other, train_rows)) < 10


def test_cli_in_fresh_process_gives_identical_bytes(tmp_path, capsys):
    here, there = tmp_path / "here.jsonl", tmp_path / "there.jsonl"
    assert P.main(["--split", "eval", "--num", "60", "--seed", "7", str(here)]) == 0
    assert "wrote 60 eval prompts" in capsys.readouterr().out
    env = dict(os.environ, PYTHONHASHSEED="4242")
    proc = subprocess.run([sys.executable, "-m", "dice_jax.judge.prompts", "--split", "eval",
                           "--num", "60", "--seed", "7", str(there)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert here.read_bytes() == there.read_bytes()
    assert P.read_prompts(str(here)) == P.generate_prompts("eval", 60, seed=7)


def test_cli_refuses_existing_output(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    out.write_text("keep me\n")
    assert P.main(["--split", "train", "--num", "5", "--seed", "0", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "already exists" in err
    assert out.read_text() == "keep me\n"
    assert P.main(["--split", "train", "--num", "0", str(tmp_path / "q.jsonl")]) == 2
    assert not (tmp_path / "q.jsonl").exists()


# --- JSONL io ---------------------------------------------------------------------------------

def test_jsonl_round_trip_and_datasets(tmp_path, train_rows):
    path = str(tmp_path / "sub" / "train.jsonl")
    rows = train_rows[:80]
    P.write_prompts(path, rows)
    assert P.read_prompts(path) == rows
    assert [f for f in os.listdir(tmp_path / "sub")] == ["train.jsonl"]  # no temporary left
    with pytest.raises(DiceError, match="already exists"):
        P.write_prompts(path, rows)

    from datasets import load_dataset

    ds = load_dataset("json", data_files=path, split="train",
                      cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 80 and ds["prompt"] == [r["prompt"] for r in rows]
    assert ds["instruction_ids"] == [r["instruction_ids"] for r in rows]
    # rows read back through datasets carry None for absent kwargs; they score the same
    responses = ["A short reply, with a comma.", '"Quoted reply"', "*   one\n* two"]
    for loaded, row in zip(ds, rows):
        for response in responses:
            assert S.score_response(loaded, response) == S.score_response(row, response)


def test_read_prompts_rejects_bad_rows(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "prompt": "p"}\n')
    with pytest.raises(DiceError, match=r"bad\.jsonl:1"):
        P.read_prompts(str(bad))
    bad.write_text("not json\n")
    with pytest.raises(DiceError, match="not valid JSON"):
        P.read_prompts(str(bad))


# --- gold scores ------------------------------------------------------------------------------

ROW = {"id": "r", "prompt": "Explain why the sky is blue. ...", "base_task": "...",
       "instruction_ids": ["punctuation:no_comma", "keywords:existence", "startend:quotation"],
       "kwargs": [{}, {"keywords": ["light", "sky"]}, {}]}


def test_fraction_followed_and_all_followed_flag():
    all_three = S.score_response(ROW, '"The sky scatters blue light"')
    assert all_three.followed == (True, True, True)
    assert all_three.score == 1.0 and all_three.all_followed
    two = S.score_response(ROW, '"The sky scatters blue light, mostly"')
    assert two.followed == (False, True, True)
    # Ratios of small counts: approx (default rel 1e-6) only absorbs the division's rounding.
    assert two.score == pytest.approx(2 / 3) and not two.all_followed
    none = S.score_response(ROW, "Because of air, mostly")
    assert none.followed == (False, False, False) and none.score == 0.0
    assert none.response_chars == len("Because of air, mostly")


def test_empty_response_follows_nothing():
    # no_comma alone would pass "", and langdetect cannot detect "": both must fail
    row = {"instruction_ids": ["punctuation:no_comma", "language:response_language"],
           "kwargs": [{}, {"language": "en"}]}
    for response in ("", "  \n "):
        score = S.score_response(row, response)
        assert score.followed == (False, False) and score.empty and score.errors == ()


def test_checker_exception_counts_as_not_followed(monkeypatch):
    # a keyword that is not a valid regular expression makes the checker raise re.error
    row = {"instruction_ids": ["keywords:existence", "punctuation:no_comma"],
           "kwargs": [{"keywords": ["("]}, {}]}
    score = S.score_response(row, "No commas here (really)")
    assert score.followed == (False, True) and score.errors == ("keywords:existence",)

    def boom(self, value):
        raise RuntimeError("checker bug")

    monkeypatch.setattr(instructions.CommaChecker, "check_following", boom)
    score = S.score_response(row, "No commas here")
    assert score.followed == (False, False) and len(score.errors) == 2
    assert S.aggregate([score])["checker_errors"] == 2


def test_bad_rows_raise():
    with pytest.raises(DiceError, match="no instruction_ids"):
        S.score_response({"instruction_ids": [], "kwargs": []}, "x")
    with pytest.raises(DiceError, match="kwargs"):
        S.score_response({"instruction_ids": ["punctuation:no_comma"], "kwargs": []}, "x")
    with pytest.raises(DiceError, match="unknown instruction"):
        S.score_response({"instruction_ids": ["nope:nothing"], "kwargs": [{}]}, "x")
    with pytest.raises(DiceError):
        S.score_responses([ROW], [])


def test_aggregates_on_hand_made_set():
    responses = ['"The sky scatters blue light"',          # 3/3
                 '"The sky scatters blue light, mostly"',  # 2/3
                 "",                                        # 0/3, empty
                 "Light."]                                  # 1/3: no comma only
    scores = S.score_responses([ROW] * 4, responses)
    # Ratios of small counts (here and below): approx's default rel 1e-6 absorbs the division.
    assert [s.score for s in scores] == pytest.approx([1, 2 / 3, 0, 1 / 3])
    agg = S.aggregate(scores)
    assert agg["prompt_level_strict_acc"] == pytest.approx(1 / 4)
    assert agg["instruction_level_strict_acc"] == pytest.approx(6 / 12)
    assert agg["mean_score"] == pytest.approx(0.5)
    assert agg["mean_response_chars"] == pytest.approx(sum(map(len, responses)) / 4)
    assert (agg["num_prompts"], agg["num_instructions"]) == (4, 12)
    assert (agg["checker_errors"], agg["empty_responses"]) == (0, 1)
    # instruction level pools instructions: a 1-instruction row weighs less than a 3-one
    one = {"instruction_ids": ["punctuation:no_comma"], "kwargs": [{}]}
    mixed = S.aggregate([S.score_response(one, "a, b"), S.score_response(ROW, responses[0])])
    # Ratios of small counts again (default rel 1e-6).
    assert mixed["instruction_level_strict_acc"] == pytest.approx(3 / 4)
    assert mixed["prompt_level_strict_acc"] == pytest.approx(1 / 2)
    with pytest.raises(DiceError):
        S.aggregate([])


# --- preference labelling ---------------------------------------------------------------------

def test_label_preferences_hand_made():
    labels = S.label_preferences([
        [1.0, 0.5, 0.0],          # chosen 0, rejected 2
        [1 / 3, 1 / 3, 1 / 3],    # tie: dropped
        [0.0, 0.5, 0.5, 0.0],     # equal best / worst: lowest index of each
        [0.0, 0.0],               # tie
        [0.25, 1.0],              # chosen 1, rejected 0
    ])
    assert labels.num_prompts == 5 and labels.num_ties == 2
    assert [(p.prompt_index, p.chosen_index, p.rejected_index) for p in labels.pairs] == [
        (0, 0, 2), (2, 1, 0), (4, 1, 0)]
    assert [(p.chosen_score, p.rejected_score) for p in labels.pairs] == [
        (1.0, 0.0), (0.5, 0.0), (1.0, 0.25)]
    assert S.label_preferences([]).pairs == ()
    with pytest.raises(DiceError, match="at least 2"):
        S.label_preferences([[1.0]])
    with pytest.raises(DiceError, match="NaN"):
        S.label_preferences([[1.0, float("nan")]])


def test_preference_rows_from_gold_scores():
    responses = [['"The sky scatters blue light"', "Light, sky.", "Sky, ok"],
                 ["a, b", "c, d"]]
    prompts = [ROW, {"id": "q", "prompt": "Q", "instruction_ids": ["punctuation:no_comma"],
                     "kwargs": [{}]}]
    scores = [[S.score_response(p, r).score for r in rs] for p, rs in zip(prompts, responses)]
    # 1/3 is not exact in binary: approx's default rel 1e-6 absorbs its rounding.
    assert scores == [[1.0, pytest.approx(1 / 3), 0.0], [0.0, 0.0]]
    labels = S.label_preferences(scores)
    assert labels.num_ties == 1  # both replies to "Q" use a comma
    rows = S.preference_rows(prompts, responses, labels)
    assert rows == [{"id": "r", "prompt": ROW["prompt"], "chosen": responses[0][0],
                     "rejected": responses[0][2], "chosen_score": 1.0,
                     "rejected_score": 0.0}]
    json.dumps(rows)  # serialisable
