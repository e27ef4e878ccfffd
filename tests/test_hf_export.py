"""Export to an HF folder that transformers loads cleanly; import after export is bit-exact."""

import json
import os

import jax
import numpy as np
import pytest
from helpers import hf_logits, padded_batch, save_hf, tiny_hf_model

from dice_jax.checkpoints import load_model
from dice_jax.checkpoints.hf import export_hf_folder, import_hf_folder
from dice_jax.convert import main as convert_main


def _leaves_equal(a, b):
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kind", ["llama", "llama_untied", "mistral"])
def test_export_reloads_in_transformers_with_same_logits(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_hf_model(kind)
    params, config = import_hf_folder(save_hf(model, str(tmp_path / "src")))
    out = str(tmp_path / "exported")
    export_hf_folder(params, config, out)
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    ids, mask = padded_batch(config.vocab_size, [9, 4], 9, left=[True, False], seed=5)
    real = mask.astype(bool)
    # Same float32 weights and the same PyTorch code: only load-time reordering, 1e-5.
    np.testing.assert_allclose(hf_logits(reloaded.eval(), ids, mask)[real],
                               hf_logits(model, ids, mask)[real], atol=1e-5)
    again, config2 = import_hf_folder(out)
    assert config2 == config
    _leaves_equal(params, again)
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen["eos_token_id"] == 2


def test_sharded_export_and_import(tmp_path):
    model = tiny_hf_model("llama_untied")
    params, config = import_hf_folder(save_hf(model, str(tmp_path / "src")))
    out = str(tmp_path / "sharded")
    export_hf_folder(params, config, out, max_shard_bytes=40_000)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    again, _ = import_hf_folder(out)
    _leaves_equal(params, again)


def test_bfloat16_export_loads_in_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    params, config = import_hf_folder(save_hf(tiny_hf_model("mistral"), str(tmp_path / "src")))
    out = str(tmp_path / "bf16")
    export_hf_folder(params, config, out, dtype="bfloat16")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"


def test_convert_cli_round_trip_through_orbax(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_hf_model("llama")
    src = save_hf(model, str(tmp_path / "src"))
    _save_tiny_tokenizer(src)
    ckpt, hf_out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    assert convert_main([src, ckpt]) == 0
    assert os.path.isfile(os.path.join(ckpt, "dice_checkpoint.json"))
    assert convert_main([ckpt, hf_out]) == 0
    _leaves_equal(import_hf_folder(src)[0], import_hf_folder(hf_out)[0])
    reloaded = AutoModelForCausalLM.from_pretrained(hf_out)
    ids, mask = padded_batch(97, [6], 6, left=[False], seed=7)
    # Same float32 weights and the same PyTorch code: only load-time reordering, 1e-5.
    np.testing.assert_allclose(hf_logits(reloaded, ids, mask), hf_logits(model, ids, mask),
                               atol=1e-5)
    tok = AutoTokenizer.from_pretrained(hf_out)
    assert tok("ab")["input_ids"] == AutoTokenizer.from_pretrained(src)("ab")["input_ids"]
    loaded = load_model(ckpt)
    assert loaded.kind == "dice" and loaded.tokenizer is not None


def test_convert_accepts_relative_paths(tmp_path, monkeypatch):
    src = save_hf(tiny_hf_model("mistral"), str(tmp_path / "src"))
    monkeypatch.chdir(tmp_path)
    assert convert_main(["src", "rel/ckpt"]) == 0
    assert convert_main(["rel/ckpt", "rel/hf"]) == 0
    assert oct(os.stat("rel/hf").st_mode & 0o777) != oct(0o700)
    _leaves_equal(import_hf_folder(src)[0], import_hf_folder("rel/hf")[0])


def test_gguf_to_dice_checkpoint_keeps_chat_template(tmp_path):
    ckpt = str(tmp_path / "smol")
    assert convert_main(["embedded:smollm2", ckpt, "--dtype", "bfloat16"]) == 0
    loaded = load_model(ckpt)
    assert loaded.config.param_dtype == "bfloat16" and loaded.config.num_layers == 30
    assert loaded.params["embed"].dtype == jax.numpy.bfloat16
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "SmolLM" in text


def _save_tiny_tokenizer(folder):
    """A real byte-level BPE tokenizer over the tiny model's 97-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(ord("a") + i): i + 3 for i in range(26)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
