"""Model configs: HF config.json in both field conventions, presets, JSON round trip."""

import pytest

from dice_jax.errors import CheckpointError
from dice_jax.models.config import ModelConfig, RopeScaling
from dice_jax.models.presets import PRESETS, preset

# Published config.json files (the fields that matter), written out as literals.
LLAMA_3P2_1B_V4 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False,
}
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
}


def test_legacy_hf_fields_equal_preset():
    assert ModelConfig.from_hf_dict(LLAMA_3P2_1B_V4) == preset("llama3p2_1b")
    assert ModelConfig.from_hf_dict(MISTRAL_7B) == preset("mistral_7b")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_dict_round_trip(name):
    config = preset(name)
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
    assert ModelConfig.from_json(config.to_json()) == config


def test_transformers_reads_our_config():
    from transformers import AutoConfig

    hf = AutoConfig.for_model(**preset("llama3p2_1b").to_hf_dict())
    assert hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["factor"] == 32.0
    assert hf.num_key_value_heads == 8 and hf.tie_word_embeddings


def test_parameter_counts():
    # Published parameter counts, to the precision they are quoted (8.03B, 134.5M, ...).
    assert abs(preset("llama3_8b").num_params - 8.03e9) < 0.01e9
    assert abs(preset("mistral_7b").num_params - 7.24e9) < 0.01e9
    assert abs(preset("smollm2_135m").num_params - 134.5e6) < 0.5e6
    assert abs(preset("llama3p2_1b").num_params - 1.236e9) < 0.005e9


def test_bad_configs():
    with pytest.raises(CheckpointError, match="unsupported architecture"):
        ModelConfig.from_hf_dict({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(CheckpointError, match="missing key 'hidden_size'"):
        ModelConfig.from_hf_dict({k: v for k, v in MISTRAL_7B.items() if k != "hidden_size"})
    with pytest.raises(CheckpointError, match="unsupported RoPE type 'yarn'"):
        ModelConfig.from_hf_dict({**MISTRAL_7B, "rope_scaling": {"rope_type": "yarn",
                                                                 "factor": 4.0}})
    with pytest.raises(ValueError, match="multiple"):
        preset("tiny", num_heads=3, num_kv_heads=2)
    with pytest.raises(KeyError, match="known"):
        preset("gpt5")
    assert RopeScaling(8.0, 1.0, 4.0, 8192).factor == 8.0
