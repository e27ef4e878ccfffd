"""Run configs: overrides, validation with named keys, paper templates, the run folder."""

import json
import os

import pytest

from dice_jax.chat_templates import TEMPLATES, resolve_chat_template
from dice_jax.run.config import ConfigError, build_config, parse_config_args
from dice_jax.run.folder import RunFolder

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def cfg(name):
    return os.path.join(CONFIGS, f"{name}.py")


@pytest.mark.parametrize("name", ["zephyr", "llama3"])
def test_paper_configs_match_dice_md(name):
    c = build_config(cfg(name), [])
    assert (c.sampling.num_samples, c.dice.beta, c.rounds, c.train.max_steps) == (16, 0.1, 2, 300)
    assert (c.train.batch_size, c.train.learning_rate, c.train.max_length) == (32, 5e-7, 4096)
    assert c.data.max_prompts == 10000 and c.train.weight_decay == 0.0
    temp, top_p = (0.7, 0.9) if name == "zephyr" else (0.9, 1.0)
    assert (c.sampling.temperature, c.sampling.top_p) == (temp, top_p)


def test_overrides_and_their_errors():
    spec, overrides, rest = parse_config_args(
        [f"--config={cfg('zephyr')}", "--config.dice.gamma=0.25", "--config.rounds", "3",
         "--config.model.remat=false", "--other"])
    assert rest == ["--other"]
    c = build_config(spec, overrides, device_count=8)
    assert (c.dice.gamma, c.rounds, c.model.remat) == (0.25, 3, False)
    cases = {
        "dice.gamm=0.2": "unknown key (did you mean 'dice.gamma'?)",
        "dice.gamma=1.5": "config.dice.gamma: 1.5 must lie in [0, 1]",
        "sampling.num_samples=1": "K=1",
        "dice.beta=0": "config.dice.beta",
        "rounds=two": "--config.rounds=two: expected type int",
        "mesh.data=3": "does not match the 8 available device(s)",
        "train.loss_type=dpo2": "config.train.loss_type",
    }
    for override, message in cases.items():
        key, value = override.split("=")
        with pytest.raises(ConfigError, match=None) as err:
            build_config(cfg("zephyr"), [(key, value)], device_count=8)
        assert message in str(err.value)
    with pytest.raises(ConfigError, match="--config=FILE is required"):
        parse_config_args(["--config.rounds=2"])
    with pytest.raises(ConfigError, match="not found"):
        build_config("configs/nope.py", [])


def test_named_chat_templates():
    assert resolve_chat_template("zephyr") == TEMPLATES["zephyr"]
    assert resolve_chat_template(None) is None
    assert resolve_chat_template("{{ x }}") == "{{ x }}"
    with pytest.raises(ValueError, match="unknown chat template"):
        resolve_chat_template("chatml2")


def test_run_folder_stages_and_resume(tmp_path):
    config = {"rounds": 1, "dice": {"gamma": 0.5}}
    folder = RunFolder(str(tmp_path / "run"), config)
    calls = []

    def work(path):
        calls.append(path)
        open(os.path.join(path, "out.txt"), "w").write("done")
        return {"rows": 3}

    final = folder.run_stage("round_1/sample", work)
    assert open(os.path.join(final, "out.txt")).read() == "done"
    assert RunFolder(str(tmp_path / "run"), config).info("round_1/sample")["rows"] == 3
    # Resume: complete stages are not recomputed; rounds may grow.
    again = RunFolder(str(tmp_path / "run"), {**config, "rounds": 2})
    again.run_stage("round_1/sample", work)
    assert len(calls) == 1
    with pytest.raises(ConfigError, match=r"dice\.gamma differ"):
        RunFolder(str(tmp_path / "run"), {"rounds": 1, "dice": {"gamma": 0.1}})


def test_killed_stage_leaves_no_final_folder_and_reruns(tmp_path):
    folder = RunFolder(str(tmp_path / "run"), {})

    def dies(path):
        open(os.path.join(path, "half.txt"), "w").write("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        folder.run_stage("round_1/score", dies)
    assert not os.path.exists(folder.path("round_1/score"))
    assert not folder.is_complete("round_1/score")
    # A resumable stage keeps its partial folder across a failure and sees it again.
    seen = []

    def train(path):
        seen.append(sorted(os.listdir(path)))
        if len(seen) == 1:
            open(os.path.join(path, "ckpt_10"), "w").write("x")
            raise KeyboardInterrupt
        return None

    with pytest.raises(KeyboardInterrupt):
        folder.run_stage("round_1/train", train, resumable=True)
    folder.run_stage("round_1/train", train, resumable=True)
    assert seen == [[], ["ckpt_10"]] and folder.is_complete("round_1/train")
    manifest = json.load(open(os.path.join(folder.root, "manifest.json")))
    assert set(manifest["stages"]) == {"round_1/train"}
