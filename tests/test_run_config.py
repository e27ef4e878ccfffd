"""Run configs: overrides, validation with named keys, paper templates, the run folder."""

import json
import os

import pytest

from dice_jax.chat_templates import TEMPLATES, resolve_chat_template
from dice_jax.cli import config_of, parse_command_line
from dice_jax.config import RunConfig, validate
from dice_jax.errors import ConfigError
from dice_jax.run.folder import RunFolder

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def cfg(name):
    return os.path.join(CONFIGS, f"{name}.py")


def build_config(spec, overrides, device_count=None, extra=()):
    """The command line's path: config file, `--config.KEY=VALUE` overrides, validation."""
    argv = [f"--config={spec}", *(f"--config.{k}={v}" for k, v in overrides), *extra]
    return validate(config_of(parse_command_line(argv, "train", "", run_config=True)[0]),
                    device_count)


@pytest.mark.parametrize("name", ["zephyr", "llama3"])
def test_paper_configs_match_the_paper(name):
    c = build_config(cfg(name), [])
    assert (c.sampling.num_samples, c.train.beta, c.rounds, c.train.max_steps) == (16, 0.1, 2, 300)
    assert (c.train.batch_size, c.train.learning_rate, c.train.max_length) == (32, 5e-7, 4096)
    assert c.data.max_prompts == 10000 and c.train.weight_decay == 0.0
    temp, top_p = (0.7, 0.9) if name == "zephyr" else (0.9, 1.0)
    assert (c.sampling.temperature, c.sampling.top_p) == (temp, top_p)


def test_overrides_and_their_errors():
    fv, rest = parse_command_line(
        [f"--config={cfg('zephyr')}", "--config.dice.gamma=0.25", "--config.rounds", "3",
         "--config.model.remat=false", "--config.data.max_prompts=none", "other"], "train", "",
        run_config=True)
    assert rest == ["other"]
    c = validate(config_of(fv), device_count=8)
    assert (c.dice.gamma, c.rounds, c.model.remat, c.data.max_prompts) == (0.25, 3, False, None)
    assert build_config(cfg("zephyr"), [("train.loss_type", "kto")]).train.loss_type == "kto_pair"
    cases = {
        "dice.gamm=0.2": "unknown key (did you mean 'dice.gamma'?)",
        "dice.gamma=1.5": "config.dice.gamma: 1.5 must be >= 0 and <= 1",
        "sampling.num_samples=1": "K=1",
        "train.beta=0": "config.train.beta",
        "dice.beta=0.2": "use train.beta",
        "sampling.seed=3": "config.sampling.seed: set by the run itself",
        "rounds=two": "--config.rounds=two",
        "rounds=none": "cannot be None",
        "mesh.data=3": "does not match the 8 available device(s)",
        "train.loss_type=dpo2": "config.train.loss_type",
        "dice.reward_scale=big": "config.dice.reward_scale",
    }
    for override, message in cases.items():
        key, value = override.split("=")
        with pytest.raises(ConfigError) as err:
            build_config(cfg("zephyr"), [(key, value)], device_count=8)
        assert message in str(err.value)
    with pytest.raises(ConfigError, match="--config=FILE is required"):
        parse_command_line(["--config.rounds=2"], "train", "", run_config=True)
    with pytest.raises(ConfigError, match="not found"):
        build_config("configs/nope.py", [])


def test_one_beta_reaches_the_loss_and_the_reward():
    from dice_jax.run.stages import round_settings

    c = build_config(cfg("tiny"), [("train.beta", "0.25")])
    sampling, data, train = round_settings(c, seed=7)
    assert (train.beta, data.beta, data.scale) == (0.25, 0.25, 0.25)
    assert (sampling.seed, data.seed, train.seed) == (7, 7, 7)
    c = build_config(cfg("tiny"), [("dice.reward_scale", "none")])
    assert round_settings(c, seed=0)[1].scale == 1.0


def test_every_key_is_declared_with_help():
    from dice_jax.settings import describe_settings

    rows = describe_settings(RunConfig())
    assert len(rows) > 60 and all(help_text for _, _, help_text in rows)
    assert "train.beta" in {key for key, _, _ in rows}
    assert "sampling.seed" not in {key for key, _, _ in rows}  # set by the run


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
