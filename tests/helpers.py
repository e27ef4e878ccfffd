"""Shared test helpers: tiny random HF models (PyTorch, reference only) and their logits."""

from __future__ import annotations

import os

import numpy as np

LLAMA_KW = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_hf_model(kind: str, seed: int = 0, **overrides):
    """A tiny random transformers model in float32.

    kind: "llama" (GQA + llama3 RoPE scaling + tied embeddings), "llama_untied", or
    "mistral" (GQA + sliding window 5, shorter than the test sequences).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    if kind == "mistral":
        config = MistralConfig(**LLAMA_KW, sliding_window=5, rope_theta=10000.0)
        config.update(overrides)
        model = MistralForCausalLM(config)
    else:
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        config = LlamaConfig(**LLAMA_KW, rope_scaling=scaling if kind == "llama" else None,
                             rope_theta=500000.0 if kind == "llama" else 10000.0,
                             tie_word_embeddings=(kind == "llama"))
        config.update(overrides)
        model = LlamaForCausalLM(config)
    # Random norms so a wrong norm mapping cannot pass unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.eval().float()


def save_hf(model, folder: str, **kw) -> str:
    model.save_pretrained(folder, **kw)
    return folder


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    import torch

    ids = torch.tensor(input_ids, dtype=torch.long)
    mask = torch.tensor(attention_mask, dtype=torch.long)
    positions = torch.clamp(mask.cumsum(-1) - 1, min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions)
    return out.logits.float().numpy()


def padded_batch(vocab: int, lengths: list[int], total: int, left: list[bool],
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids and a 0/1 mask: row i has lengths[i] real tokens, padded left or right."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for i, (n, is_left) in enumerate(zip(lengths, left)):
        sl = slice(total - n, total) if is_left else slice(0, n)
        ids[i, sl] = rng.integers(3, vocab, n)
        mask[i, sl] = 1
    return ids, mask


def gguf_path() -> str:
    from dice_jax.checkpoints import embedded_gguf_path

    path = embedded_gguf_path("smollm2")
    assert os.path.isfile(path)
    return path
