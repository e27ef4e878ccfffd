"""The shipped preference data of the embedded default (`builtin:smollm2`): it loads, its
labels agree with the judge, the package ships it, and its recorded command regenerates
the first batch bit for bit."""

from __future__ import annotations

import fnmatch
import json
import os
import shlex

import pytest

from dice_jax.data import BUILTIN_DIR, load_preference_data
from dice_jax.judge.build_data import build, parse_args
from dice_jax.judge.prompts import generate_prompts
from dice_jax.judge.score import score_response

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(BUILTIN_DIR, "smollm2.jsonl")
README = os.path.join(BUILTIN_DIR, "README.md")
COMMAND = "python -m dice_jax.judge.build_data"


def recorded_args():
    """The build command recorded in the README, parsed by the tool's own parser."""
    with open(README, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip().startswith(COMMAND)]
    assert len(lines) == 1, f"{README} must record exactly one build command"
    args = parse_args(shlex.split(lines[0])[3:])
    assert os.path.normpath(args.out) == os.path.relpath(DATA, ROOT)
    return args


@pytest.fixture(scope="module")
def shipped():
    with open(DATA, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_shipped_file_is_small_and_loads(shipped):
    assert os.path.getsize(DATA) < 2 * 2**20
    rows = load_preference_data("builtin:smollm2")
    assert len(rows) == len(shipped) >= 100
    assert all(isinstance(r[k], str) and r[k].strip() for r in rows
               for k in ("prompt", "chosen", "rejected"))
    assert len({r["id"] for r in rows}) == len(rows)


def test_labels_agree_with_the_judge(shipped):
    args = recorded_args()
    # Prompts and their instructions rebuilt from the generator, not from the rows.
    prompts = {p["id"]: p for p in generate_prompts("train", args.num_prompts,
                                                    args.prompt_seed)}
    for row in shipped:
        prompt = prompts[row["id"]]
        assert row["prompt"] == prompt["prompt"]
        chosen = score_response(prompt, row["chosen"]).score
        rejected = score_response(prompt, row["rejected"]).score
        assert chosen > rejected, row["id"]
        assert (chosen, rejected) == (row["chosen_score"], row["rejected_score"])
        assert len(row["scores"]) == args.num_samples
        assert (max(row["scores"]), min(row["scores"])) == (chosen, rejected)
        assert row["scores"][row["chosen_index"]] == chosen
        assert row["scores"][row["rejected_index"]] == rejected


def test_setup_cfg_ships_the_data():
    from setuptools.config.setupcfg import read_configuration

    config = read_configuration(os.path.join(ROOT, "setup.cfg"))
    patterns = config["options"]["package_data"]["dice_jax"]
    for name in ("smollm2.jsonl", "README.md"):
        assert any(fnmatch.fnmatch(f"builtin_data/{name}", p) for p in patterns), name


@pytest.mark.slow  # samples a batch with SmolLM2; README "Test" names the command
def test_first_batch_regenerates_bit_for_bit(shipped, tmp_path):
    args = recorded_args()
    # Batches are fixed: prompts [0, B) always run together in the same shapes.
    args.num_prompts = args.batch_prompts
    args.out = str(tmp_path / "regenerated.jsonl")
    stats = build(args)
    with open(args.out, encoding="utf-8") as f:
        regenerated = f.read().splitlines()
    with open(DATA, encoding="utf-8") as f:
        lines = f.read().splitlines()
    first = {p["id"] for p in generate_prompts("train", args.batch_prompts, args.prompt_seed)}
    expected = [line for line, row in zip(lines, shipped, strict=True) if row["id"] in first]
    assert regenerated, "the first batch gave no pair; regenerate more prompts"
    assert regenerated == expected  # byte-identical rows
    assert stats["prompts"] == args.batch_prompts
