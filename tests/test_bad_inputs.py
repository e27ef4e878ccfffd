"""Bad checkpoints give one clear error naming the file, exit code 2, nothing written."""

import json
import os
import shutil

import pytest
from helpers import save_hf, tiny_hf_model

from dice_jax.checkpoints.hf import import_hf_folder
from dice_jax.convert import main as convert_main
from dice_jax.errors import CheckpointError


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
