"""The whole run: `python -m dice_jax.train --config=configs/tiny.py`, resume after SIGKILL.

The tiny config (random model, toy data) runs round 0 and two DICE rounds. A run killed
with SIGKILL (fault injection, `DICE_JAX_KILL_AT`) during sampling, scoring or training and
then started again with the same command must leave the same data sets and the same final
weights as an uninterrupted run.
"""

import json
import os
import signal

import numpy as np
import pytest
from helpers import train_tiny as train

from dice_jax.run.folder import seed_stages


def manifest(run_dir):
    with open(os.path.join(run_dir, "manifest.json")) as f:
        return set(json.load(f)["stages"])


def read(path):
    with open(path) as f:
        return f.read()


def policy_params(run_dir, round_index):
    from dice_jax.checkpoints.orbax_io import load_checkpoint

    params, _ = load_checkpoint(os.path.join(run_dir, f"round_{round_index}", "train",
                                             "policy"))
    import jax

    return jax.tree.leaves(jax.device_get(params))


@pytest.fixture(scope="module")
def reference_run(tiny_run):
    """The uninterrupted run: the session's shared one (conftest)."""
    return tiny_run


ORDER = ["start/eval", "round_0/train", "round_0/eval",
         *(f"round_{t}/{s}" for t in (1, 2)
           for s in ("sample", "score", "data", "train", "eval", "report")), "export"]
EXPECTED = set(ORDER)


def test_tiny_config_runs_two_rounds_end_to_end(reference_run):
    assert manifest(reference_run) == EXPECTED
    for t in (1, 2):
        data = os.path.join(reference_run, f"round_{t}", "data")
        with open(os.path.join(data, "stats.json")) as f:
            stats = json.load(f)
        mixed = [json.loads(line) for line in read(os.path.join(data, "mixed.jsonl")).split(
            "\n") if line]
        assert stats["num_pairs"] >= 1 and len(mixed) == stats["replay"]["num_rows"]
        for name in ("length_gap.png", "alpha_search.png", "pairs.jsonl", "samples.jsonl"):
            assert os.path.getsize(os.path.join(data, name)) > 0
        train_dir = os.path.join(reference_run, f"round_{t}", "train")
        records = [json.loads(line) for line in read(os.path.join(
            train_dir, "metrics.jsonl")).splitlines()]
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm",
                "learning_rate"} <= set(records[0])
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(
            os.path.join(train_dir, "tensorboard")))
        assert not os.path.exists(os.path.join(train_dir, "checkpoints"))
        report_path = os.path.join(reference_run, f"round_{t}", "report", "report.md")
        report = read(report_path)
        assert "alpha*" in report and "training_curves.png" in report
        stages = json.loads(read(os.path.join(reference_run, "manifest.json")))["stages"]
        assert os.path.samefile(stages[f"round_{t}/report"]["report"], report_path)
    # DICE trains round t from pi_theta(t-1): the two rounds' policies differ.
    a, b = policy_params(reference_run, 1), policy_params(reference_run, 2)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))
    hf = os.path.join(reference_run, "export", "hf")
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(
        os.listdir(hf))
    assert "DICE" in read(os.path.join(reference_run, "summary.md"))
    # Running the finished command again recomputes nothing.
    before = os.path.getmtime(os.path.join(reference_run, "manifest.json"))
    train(reference_run)
    assert os.path.getmtime(os.path.join(reference_run, "manifest.json")) == before


@pytest.mark.parametrize("kills", [("round_1/sample:written", "round_1/score:written"),
                                   ("round_2/train:step=2",)],
                         ids=["sample-then-score", "train"])
def test_sigkill_then_resume_gives_the_same_run(reference_run, tmp_path, kills):
    run_dir = str(tmp_path / "killed")
    # The stages before the first killed one are taken from the uninterrupted run (the run
    # loop treats them as done, as after any resume), so each case recomputes only from its
    # kill point on; the end-to-end test above covers a run from scratch. Two kills in a row
    # (during sampling, then during scoring in the resumed run) also cover a crash of a
    # resumed run.
    seed_stages(reference_run, run_dir, ORDER[:ORDER.index(kills[0].split(":")[0])])
    for kill_at in kills:
        proc = train(run_dir, kill_at=kill_at)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr[-4000:])
        assert kill_at.split(":")[0] not in manifest(run_dir)
    train(run_dir)
    assert manifest(run_dir) == EXPECTED
    for t in (1, 2):
        for name in ("samples.jsonl", "pairs.jsonl", "mixed.jsonl"):
            assert read(os.path.join(run_dir, f"round_{t}", "data", name)) == read(
                os.path.join(reference_run, f"round_{t}", "data", name)), (t, name)
    for x, y in zip(policy_params(run_dir, 2), policy_params(reference_run, 2)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("override, message", [
    ("--config.dice.gamma=1.5", "config.dice.gamma"),
    ("--config.sampling.num_samples=1", "K=1"),
    ("--config.train.beta=0", "config.train.beta"),
    ("--config.dice.beta=0.2", "use train.beta"),
    ("--config.mesh.tensor=3", "config.mesh"),
    ("--config.dice.gama=0.5", "did you mean 'dice.gamma'"),
    ("--config.rounds=two", "config.rounds"),
])
def test_bad_config_exits_2_before_any_work(tmp_path, override, message):
    run_dir = str(tmp_path / "bad")
    proc = train(run_dir, override, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.count("error:") == 1
    assert not os.path.exists(run_dir)


def test_sigterm_checkpoints_the_step_in_progress_and_resumes(reference_run, tmp_path):
    run_dir = str(tmp_path / "preempted")
    seed_stages(reference_run, run_dir, ORDER[:ORDER.index("round_2/train")])
    # tiny saves every 2 steps: a SIGTERM during step 3 must checkpoint step 3 itself.
    proc = train(run_dir, term_at="round_2/train:step=3")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert last.startswith("stopped: SIGTERM: checkpoint of step 3 saved"), last
    checkpoints = os.path.join(run_dir, "round_2", "train.partial", "checkpoints")
    assert "3" in os.listdir(checkpoints) and "round_2/train" not in manifest(run_dir)
    train(run_dir)
    assert manifest(run_dir) == EXPECTED
    records = [json.loads(line) for line in read(os.path.join(
        run_dir, "round_2", "train", "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # no step lost, none repeated
    for x, y in zip(policy_params(run_dir, 2), policy_params(reference_run, 2)):
        np.testing.assert_array_equal(x, y)
