"""Bad inputs give one clear error naming the file (and row / key), exit code 2: checkpoints
(nothing written), offline-data rows of the wrong type, a run_dir that cannot be a folder."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import save_hf, tiny_hf_model

from dice_jax.checkpoints.hf import import_hf_folder
from dice_jax.convert import main as convert_main
from dice_jax.data import load_preference_data
from dice_jax.errors import CheckpointError, ConfigError, DiceError
from dice_jax.run.folder import RunFolder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    return save_hf(tiny_hf_model("llama_untied"), str(tmp_path_factory.mktemp("good") / "m"))


@pytest.fixture
def folder(good_folder, tmp_path):
    dst = str(tmp_path / "model")
    shutil.copytree(good_folder, dst)
    return dst


def _run(capsys, *argv):
    code = convert_main(list(argv))
    err = capsys.readouterr().err
    return code, err


def _nothing_written(path):
    parent = os.path.dirname(path)
    assert not os.path.exists(path)
    assert not [f for f in os.listdir(parent) if f.startswith(f".{os.path.basename(path)}.tmp")]


def test_missing_config(folder, tmp_path, capsys):
    os.remove(os.path.join(folder, "config.json"))
    out = str(tmp_path / "out")
    code, err = _run(capsys, folder, out)
    assert code == 2 and "config.json" in err and "error:" in err
    _nothing_written(out)


def test_missing_weights(folder, tmp_path, capsys):
    os.remove(os.path.join(folder, "model.safetensors"))
    out = str(tmp_path / "out")
    code, err = _run(capsys, folder, out)
    assert code == 2 and "model.safetensors" in err
    _nothing_written(out)


def test_truncated_safetensors(folder, tmp_path, capsys):
    path = os.path.join(folder, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    out = str(tmp_path / "out")
    code, err = _run(capsys, folder, out)
    assert code == 2 and "model.safetensors" in err and "truncated" in err
    _nothing_written(out)


def test_unsupported_architecture_gpt2(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = str(tmp_path / "gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(src)
    out = str(tmp_path / "out")
    code, err = _run(capsys, src, out)
    assert code == 2 and "config.json" in err and "gpt2" in err.lower()
    _nothing_written(out)


def test_shape_disagrees_with_config(folder, tmp_path, capsys):
    cfg_path = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["intermediate_size"] = 100
    json.dump(cfg, open(cfg_path, "w"))
    out = str(tmp_path / "out")
    code, err = _run(capsys, folder, out)
    assert code == 2 and "model.safetensors" in err and "gate_proj" in err and "100" in err
    _nothing_written(out)


def test_missing_tensor_named(folder):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        import_hf_folder(folder)


def test_broken_tokenizer_file_named(folder, tmp_path, capsys):
    open(os.path.join(folder, "tokenizer.json"), "w").write("{not json")
    out = str(tmp_path / "out")
    code, err = _run(capsys, folder, out)
    assert code == 2 and "tokenizer" in err and folder in err
    _nothing_written(out)


def test_destination_exists(folder, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(capsys, folder, str(out))
    assert code == 2 and "already exists" in err
    assert os.listdir(out) == ["keep.txt"]


def test_missing_source_and_bad_gguf(tmp_path, capsys):
    code, err = _run(capsys, str(tmp_path / "nope"), str(tmp_path / "out"))
    assert code == 2 and "nope" in err
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    code, err = _run(capsys, str(bad), str(tmp_path / "out"))
    assert code == 2 and "broken.gguf" in err
    _nothing_written(str(tmp_path / "out"))


def test_hub_id_without_network_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = _run(capsys, "some-org/some-model-that-is-not-cached", str(tmp_path / "out"))
    assert code == 2 and "some-org/some-model-that-is-not-cached" in err and "hub" in err
    _nothing_written(str(tmp_path / "out"))


def test_failure_midway_leaves_nothing(folder, tmp_path, monkeypatch):
    """An error after the temporary folder exists (here: in the tokenizer step) cleans up."""
    from dice_jax.checkpoints import hf

    params, config = import_hf_folder(folder)

    class Exploding:
        def save_pretrained(self, path):
            open(os.path.join(path, "tokenizer.json"), "w").write("{")
            raise OSError("disk full")

    out = str(tmp_path / "out")
    with pytest.raises(OSError, match="disk full"):
        hf.export_hf_folder(params, config, out, tokenizer=Exploding())
    _nothing_written(out)


# ------------------------------------------- the absl command lines: --help, bad flag values
# (module, a flag of its --help, a command line with one bad value)
CLIS = [
    ("dice_jax.report", "--out", ["RUN", "--out=r.md", "--outt=x"]),
    ("dice_jax.convert", "--max_shard_size", ["SRC", "DST", "--to", "gguf"]),
    ("dice_jax.convert", "--max_shard_size", ["SRC", "DST", "--max-shard-size", "lots"]),
    ("dice_jax.training.memory", "--grad_accum", ["--preset", "tiny", "--mesh", "fsdp=x"]),
    ("dice_jax.training.memory", "--grad_accum", ["--preset", "tiny", "--mesh",
                                                  "data=2,fsdp=-1", "--devices", "3"]),
    ("dice_jax.judge.prompts", "--eval_fraction", ["--split", "dev", "--num", "3", "p.jsonl"]),
    ("dice_jax.judge.build_data", "--prompt_bucket", ["--out", "d.jsonl",
                                                      "--num-prompts", "many"]),
]


@pytest.mark.parametrize("module,flag,bad", CLIS, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else v)
def test_cli_help_exits_0_and_a_bad_value_is_one_error_line(module, flag, bad, tmp_path,
                                                             capsys, monkeypatch):
    import importlib

    main = importlib.import_module(module).main
    monkeypatch.chdir(tmp_path)
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert f"python -m {module}" in out and flag in out
    assert main(bad) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert captured.out == "" and os.listdir(tmp_path) == []


# ------------------------------------------------------------------ offline data, run_dir
GOOD_ROW = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Ten."}
CHAT_ROW = {"prompt": [{"role": "user", "content": "Name a colour."}],
            "chosen": [{"role": "user", "content": "Name a colour."},
                       {"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "user", "content": "Name a colour."},
                         {"role": "assistant", "content": "Ten."}],
            "score_chosen": 8.5, "score_rejected": 2}


def _write_rows(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _train_cli(tmp_path, *overrides):
    """The train command line a user types, with the start evaluation off (it is not what
    these tests are about, and it would cost most of the run's time before the data)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dice_jax.train", "--config=configs/tiny.py",
         "--config.eval.enabled=False", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    lines = proc.stderr.strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


def test_offline_row_with_a_number_prompt_is_one_error_line(tmp_path):
    data = _write_rows(tmp_path / "bad.jsonl", [GOOD_ROW, dict(GOOD_ROW, prompt=5)])
    code, last = _train_cli(tmp_path, f"--config.run_dir={tmp_path / 'run'}",
                            f"--config.data.offline={data}")
    assert code == 2, last
    assert last.startswith("error:") and data in last and "row 1" in last
    assert "'prompt'" in last and "int" in last


@pytest.mark.parametrize("column, value, message", [
    ("prompt", 5, r"'prompt' must be a string or a list of chat messages, got int"),
    ("chosen", None, r"'chosen' must be a string or a list of chat messages, got null"),
    ("rejected", {"text": "x"}, r"'rejected' must be a string or a list .*got dict"),
    ("prompt", ["hi"], r"'prompt': message 0 must be an object .*got str"),
    ("chosen", [{"role": "assistant", "content": 3}], r"'chosen': message 0: 'content' must be "
                                                       r"a string, got int"),
    ("rejected", [{"content": "x"}], r"'rejected': message 0: 'role' must be a string, got "
                                     r"null"),
    ("score_chosen", "high", r"'score_chosen' must be a number, got str"),
    ("score_rejected", True, r"'score_rejected' must be a number, got bool"),
])
def test_offline_row_with_a_wrong_type_names_file_row_and_column(tmp_path, column, value,
                                                                 message):
    path = _write_rows(tmp_path / "bad.jsonl",
                       [CHAT_ROW, GOOD_ROW, dict(CHAT_ROW, **{column: value})])
    with pytest.raises(DiceError, match=r"bad\.jsonl: row 2: " + message):
        load_preference_data(path)


def test_offline_rows_of_the_right_types_load(tmp_path):
    path = _write_rows(tmp_path / "good.jsonl", [CHAT_ROW, GOOD_ROW])
    rows = load_preference_data(path)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("Name a colour.", "Blue.", "Ten.")] * 2
    assert rows[0]["score_chosen"] == 8.5


def test_offline_row_that_is_not_an_object(tmp_path):
    path = _write_rows(tmp_path / "bad.jsonl", [GOOD_ROW, ["Name a colour.", "Blue.", "Ten."]])
    with pytest.raises(DiceError, match=r"bad\.jsonl: row 1: expected an object .*got list"):
        load_preference_data(path)


def test_bad_row_in_a_subset_is_named_by_its_row_in_the_file(tmp_path):
    # max_rows=9 of 10 with seed 0 drops row 1 and keeps row 9 (the bad one): the error names
    # row 9 of the file, not row 8 of the subset.
    path = _write_rows(tmp_path / "bad.jsonl", [GOOD_ROW] * 9 + [dict(GOOD_ROW, chosen=1.5)])
    with pytest.raises(DiceError, match=r"row 9: 'chosen' must be a string"):
        load_preference_data(path, max_rows=9, seed=0)


def test_run_dir_that_is_a_file_is_one_error_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.write_text("not a folder")
    code, last = _train_cli(tmp_path, f"--config.run_dir={run_dir}")
    assert code == 2, last
    assert last.startswith("error:") and "config.run_dir" in last and str(run_dir) in last
    assert run_dir.read_text() == "not a folder"


def test_run_dir_below_a_file_names_the_key(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"config\.run_dir: cannot create .*file/run"):
        RunFolder(str(tmp_path / "file" / "run"), {})


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_run_dir_not_writable_names_the_key(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o500)
    try:
        with pytest.raises(ConfigError, match=r"config\.run_dir: .*run is not writable"):
            RunFolder(str(run_dir), {})
    finally:
        run_dir.chmod(0o700)
