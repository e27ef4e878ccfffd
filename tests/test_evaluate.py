"""Evaluation: prompt sets, judged responses, metrics.json / responses.jsonl /
model_outputs.json, the report's reading of them, and the CLI (tiny random model)."""

from __future__ import annotations

import json
import os

import pytest

from dice_jax.checkpoints import load_model
from dice_jax.config import RunConfig
from dice_jax.data import load_eval_prompts
from dice_jax.errors import DiceError
from dice_jax.evaluate import main
from dice_jax.evaluation import EvalConfig, evaluate_policy, mode_settings
from dice_jax.judge.prompts import generate_prompts
from dice_jax.judge.score import score_response
from dice_jax.sampling import Sampler, SamplingConfig

NEW_TOKENS = 8
CONFIG = """
from dice_jax.config import RunConfig

def get_config():
    c = RunConfig()
    c.run_dir = {run_dir!r}
    c.model.policy = "random:tiny"
    c.round0 = True
    c.eval.num_prompts = 2
    c.eval.max_new_tokens = 4
    c.eval.seed = 1
    return c
"""


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def expected_metrics(records, rows):
    """Metrics recomputed from the written responses with the judge, row by row."""
    by_id = {r["id"]: r for r in rows}
    golds = [score_response(by_id[r["id"]], r["response"]) for r in records
             if by_id[r["id"]].get("instruction_ids")]
    out = {"mean_length": sum(len(r["response"]) for r in records) / len(records),
           "num_prompts": len(records), "num_scored": len(golds)}
    if golds:
        out["prompt_level_strict"] = sum(all(g.followed) for g in golds) / len(golds)
        out["instruction_level_strict"] = (sum(sum(g.followed) for g in golds)
                                           / sum(len(g.followed) for g in golds))
    return out, golds


def test_builtin_prompts_are_the_judges_eval_split():
    rows = load_eval_prompts("builtin:eval", 5, 7)
    assert rows == generate_prompts("eval", 5, 7)
    assert load_eval_prompts("builtin:train", 2, 0) == generate_prompts("train", 2, 0)
    with pytest.raises(DiceError, match="builtin:test"):
        load_eval_prompts("builtin:test", 2, 0)


def test_evaluate_policy_metrics_files_and_report(tiny, tmp_path):
    rows = load_eval_prompts("builtin:eval", 4, 0)
    out = tmp_path / "run" / "start" / "eval"
    sampling = SamplingConfig(num_samples=16, temperature=1.0, top_p=0.9, progress=False)
    metrics = evaluate_policy(tiny.params, tiny.config, tiny.tokenizer, rows, str(out),
                              evaluation=EvalConfig(max_new_tokens=NEW_TOKENS, seed=5),
                              sampling=sampling, generator_name="tiny",
                              dataset_name="builtin:eval")
    assert sorted(os.listdir(out)) == ["metrics.json", "model_outputs.json", "responses.jsonl"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    records = read_jsonl(out / "responses.jsonl")
    assert [(r["mode"], r["id"]) for r in records] == [
        (m, row["id"]) for m in ("greedy", "sampled") for row in rows]
    for mode in ("greedy", "sampled"):
        mine = [r for r in records if r["mode"] == mode]
        want, golds = expected_metrics(mine, rows)
        for key, value in want.items():
            # Rates and means of small counts: approx's default rel 1e-6 absorbs the division.
            assert metrics[mode][key] == pytest.approx(value), (mode, key)
        assert [r["followed"] for r in mine] == [list(g.followed) for g in golds]
        assert [r["score"] for r in mine] == pytest.approx([g.score for g in golds])
        assert all(r["num_tokens"] <= NEW_TOKENS for r in mine)
        assert metrics[mode]["settings"]["max_new_tokens"] == NEW_TOKENS
    # The greedy responses are the sampler's greedy decode of the same prompts.
    ref = Sampler(tiny.params, tiny.config, tiny.tokenizer).sample(
        [r["prompt"] for r in rows], SamplingConfig(temperature=0.0, max_new_tokens=NEW_TOKENS,
                                                    progress=False))
    assert [r["response"] for r in records if r["mode"] == "greedy"] == [
        s[0].text for s in ref.samples]
    assert metrics["sampled"]["settings"]["temperature"] == 1.0
    assert metrics["greedy"]["settings"]["temperature"] == 0.0
    # model_outputs.json: AlpacaEval's keys, readable by `datasets`, greedy outputs.
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(out / "model_outputs.json"), split="train",
                      cache_dir=str(tmp_path / "hf_cache"))
    assert set(ds.column_names) == {"instruction", "output", "generator", "dataset"}
    assert ds["instruction"] == [r["prompt"] for r in rows]
    assert ds["output"] == [r["response"] for r in records if r["mode"] == "greedy"]
    assert set(ds["generator"]) == {"tiny"} and set(ds["dataset"]) == {"builtin:eval"}
    # dice_jax.report reads the metrics as a run folder's start evaluation.
    from dice_jax.report import collect_run, table_rows

    (tmp_path / "run" / "config.json").write_text(json.dumps({"method": "dice"}))
    run = collect_run(str(tmp_path / "run"))
    base = table_rows([run])[0]
    assert base[2] == f"{100 * metrics['greedy']['prompt_level_strict']:.1f}"
    assert base[4] == f"{metrics['greedy']['mean_length']:.0f}"
    assert base[5] == f"{100 * metrics['sampled']['prompt_level_strict']:.1f}"


def test_plain_prompt_file_gets_outputs_and_length_only(tiny, tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [{"instruction": "Name three colours.", "dataset": "helpful_base"},
             {"prompt": "Write one line about tea."}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = load_eval_prompts(str(path))
    assert [r["id"] for r in rows] == ["0", "1"]
    assert "instruction_ids" not in rows[0]
    out = tmp_path / "out"
    metrics = evaluate_policy(tiny.params, tiny.config, tiny.tokenizer, rows, str(out),
                              evaluation=EvalConfig(greedy=False, seed=2,
                                                    max_new_tokens=NEW_TOKENS),
                              sampling=SamplingConfig(temperature=0.8, progress=False),
                              dataset_name=str(path))
    assert set(metrics) == {"sampled", "prompts", "generator"}
    m = metrics["sampled"]
    assert "prompt_level_strict" not in m and m["num_scored"] == 0
    records = read_jsonl(out / "responses.jsonl")
    assert all(r["followed"] is None and r["mode"] == "sampled" for r in records)
    # A mean of integers: approx's default rel 1e-6 absorbs the division.
    assert m["mean_length"] == pytest.approx(sum(len(r["response"]) for r in records) / 2)
    outputs = json.loads((out / "model_outputs.json").read_text())
    assert [o["instruction"] for o in outputs] == [lines[0]["instruction"], lines[1]["prompt"]]
    assert [o["output"] for o in outputs] == [r["response"] for r in records]
    assert [o["dataset"] for o in outputs] == ["helpful_base", str(path)]
    # An AlpacaEval-style JSON list reads the same way.
    listed = tmp_path / "outputs.json"
    listed.write_text(json.dumps(lines))
    assert load_eval_prompts(str(listed), num=1) == rows[:1]


def test_hub_prompts_ifeval_format_and_offline_error(monkeypatch):
    import datasets

    kw = {"num_words": None, "relation": None, "keywords": None}
    hub_rows = [{"key": 1000, "prompt": "Write about rain. Do not use any commas.",
                 "instruction_id_list": ["punctuation:no_comma"], "kwargs": [dict(kw)]},
                {"key": 1001, "prompt": "Describe a cat in at least 5 words.",
                 "instruction_id_list": ["length_constraints:number_words"],
                 "kwargs": [dict(kw, num_words=5, relation="at least")]}]
    seen = {}

    def fake_load(name, split):
        seen["args"] = (name, split)
        return hub_rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows = load_eval_prompts("google/IFEval", num=None)
    assert seen["args"] == ("google/IFEval", "train")
    assert [r["id"] for r in rows] == ["1000", "1001"]
    assert rows[1]["kwargs"] == [{"num_words": 5, "relation": "at least"}]
    assert score_response(rows[0], "rain falls softly").all_followed
    assert not score_response(rows[0], "rain, then sun").all_followed
    assert score_response(rows[1], "the cat sleeps all day long").all_followed

    def offline(name, split):
        raise ConnectionError("Couldn't reach 'google/IFEval' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DiceError, match=r"google/IFEval: cannot load.*network"):
        load_eval_prompts("google/IFEval", 10)


def test_prompt_errors_name_the_file_and_row(tmp_path):
    with pytest.raises(DiceError, match=r"missing\.jsonl: prompt file not found"):
        load_eval_prompts(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(DiceError, match=r"bad.jsonl: row 1: needs a non-empty string 'prompt'"):
        load_eval_prompts(str(bad))
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(DiceError, match=r"bad.jsonl:2: not valid JSON"):
        load_eval_prompts(str(bad))
    bad.write_text(json.dumps({"prompt": "x", "instruction_ids": ["punctuation:no_comma"],
                               "kwargs": [{}, {}]}) + "\n")
    with pytest.raises(DiceError, match=r"row 0: 'kwargs' must be a list of 1 objects"):
        load_eval_prompts(str(bad))
    with pytest.raises(DiceError, match="neither greedy nor sampled"):
        EvalConfig(greedy=False, sampled=False)
    with pytest.raises(DiceError, match="temperature 0"):
        mode_settings(EvalConfig(), SamplingConfig(temperature=0.0))


def test_modes_follow_the_run_config():
    c = RunConfig()
    c.eval.max_new_tokens, c.eval.seed, c.sampling.temperature = 64, 9, 0.9
    settings = mode_settings(c.eval, c.sampling)
    s, g = settings["sampled"], settings["greedy"]
    assert (s.temperature, s.top_p, s.seed, s.num_samples) == (0.9, c.sampling.top_p, 9, 1)
    for mode in (s, g):
        assert (mode.max_prompt_tokens, mode.truncate_prompts) == (
            c.sampling.max_prompt_tokens, True)
        assert (mode.max_new_tokens, mode.cache_budget_gb) == (64, c.sampling.cache_budget_gb)
    assert (g.temperature, g.top_p, g.top_k, g.num_samples) == (0.0, 1.0, 0, 1)
    c.eval.sampled = False
    assert list(mode_settings(c.eval, c.sampling)) == ["greedy"]


def test_cli_runs_and_exits_2_on_bad_input(tmp_path, capsys):
    config = tmp_path / "tiny_eval.py"
    config.write_text(CONFIG.format(run_dir=str(tmp_path / "runs")))
    assert main([f"--config={config}", "--checkpoint=random:tiny"]) == 0
    out = tmp_path / "runs" / "evaluate" / "random_tiny"
    assert sorted(os.listdir(out)) == ["metrics.json", "model_outputs.json", "responses.jsonl"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompts"] == {"num": 2, "dataset": "builtin:eval", "with_instructions": 2}
    assert metrics["greedy"]["settings"]["max_new_tokens"] == 4
    assert metrics["sampled"]["settings"]["seed"] == 1
    records = read_jsonl(out / "responses.jsonl")
    want, _ = expected_metrics([r for r in records if r["mode"] == "greedy"],
                               generate_prompts("eval", 2, 1))
    # A ratio of small counts: approx's default rel 1e-6 absorbs the division.
    assert metrics["greedy"]["prompt_level_strict"] == pytest.approx(
        want["prompt_level_strict"])
    assert "greedy: prompt-level" in capsys.readouterr().out
    # The same folder again: refused, nothing overwritten.
    assert main([f"--config={config}", "--checkpoint=random:tiny"]) == 2
    assert "already exists" in capsys.readouterr().err
    missing = tmp_path / "no_such_model"
    assert main([f"--config={config}", f"--checkpoint={missing}",
                 f"--out={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(missing) in err
    assert not os.path.exists(tmp_path / "x")
    assert main([f"--config={config}", "--config.eval.num_prompt=3"]) == 2
    assert "did you mean 'eval.num_prompts'" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "--checkpoint" in capsys.readouterr().out
    assert main([f"--config={config}", "--prompts=missing.jsonl",
                 f"--out={tmp_path / 'y'}"]) == 2
    assert "missing.jsonl: prompt file not found" in capsys.readouterr().err
