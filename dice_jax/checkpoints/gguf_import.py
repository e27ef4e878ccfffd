"""GGUF import (llama.cpp files) with the `gguf` package: weights, config and tokenizer.

Quantised tensors (Q4_0/Q4_1/Q8_0/K-quants, ...) are dequantised to float32 with
`gguf.quants.dequantize`, renamed to HF names, and the q/k projections un-permuted from
llama.cpp's interleaved RoPE layout. No torch is imported: the tokenizer is rebuilt from
the file's metadata with transformers' torch-free `convert_gguf_tokenizer`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dice_jax.checkpoints.mapping import hf_to_gguf_name, unpermute_llama_cpp
from dice_jax.checkpoints.placement import place_params
from dice_jax.errors import CheckpointError
from dice_jax.models.config import ModelConfig

SUPPORTED_GGUF_ARCHS = ("llama",)


def _reader(path: str) -> Any:
    import gguf

    if not os.path.isfile(path):
        raise CheckpointError(path, "file not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, struct errors, IndexError on bad files
        raise CheckpointError(path, f"not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader: Any, key: str, path: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise CheckpointError(path, f"GGUF metadata key {key!r} is missing")
    return field.contents()


def gguf_model_config(reader: Any, path: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig a GGUF header describes."""
    arch = _field(reader, "general.architecture", path)
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise CheckpointError(path, f"unsupported GGUF architecture {arch!r}; "
                              f"supported: {SUPPORTED_GGUF_ARCHS}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError(path, "GGUF files with a rope_freqs tensor (Llama 3.1 scaling) "
                              "are not supported; import the HF folder instead")
    heads = int(_field(reader, f"{arch}.attention.head_count", path))
    hidden = int(_field(reader, f"{arch}.embedding_length", path))
    tokens = _field(reader, "tokenizer.ggml.tokens", path)
    eos = reader.fields.get("tokenizer.ggml.eos_token_id")
    bos = reader.fields.get("tokenizer.ggml.bos_token_id")
    pad = reader.fields.get("tokenizer.ggml.padding_token_id")
    kwargs = dict(
        model_type="llama",
        vocab_size=int(_field(reader, f"{arch}.vocab_size", path, len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length", path)),
        num_layers=int(_field(reader, f"{arch}.block_count", path)),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", path, heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", path, hidden // heads)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", path, 10000.0)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", path, 8192)),
        bos_token_id=None if bos is None else int(bos.contents()),
        eos_token_ids=() if eos is None else (int(eos.contents()),),
        pad_token_id=None if pad is None else int(pad.contents()),
    )
    kwargs.update(overrides)
    try:
        return ModelConfig(**kwargs)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None


def import_gguf(path: str, shardings: Any | None = None,
                **config_overrides: Any) -> tuple[dict, ModelConfig]:
    """Params and config from a GGUF file, dequantised and placed tensor by tensor."""
    import gguf

    reader = _reader(path)
    config = gguf_model_config(reader, path, **config_overrides)
    tensors = {t.name: t for t in reader.tensors}

    def read(hf_name: str) -> tuple[np.ndarray, str]:
        name = hf_to_gguf_name(hf_name)
        if name not in tensors:
            raise CheckpointError(path, f"tensor {name!r} is missing from the GGUF file")
        t = tensors[name]
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        except Exception as e:
            raise CheckpointError(path, f"cannot dequantise {name!r} "
                                  f"({t.tensor_type.name}: {e})") from None
        if name.endswith("attn_q.weight"):
            array = unpermute_llama_cpp(array, config.num_heads)
        elif name.endswith("attn_k.weight"):
            array = unpermute_llama_cpp(array, config.num_kv_heads)
        return array, path

    params = place_params(read, config, shardings, desc=f"import {os.path.basename(path)}")
    return params, config


def gguf_tokenizer(path: str) -> Any:
    """A `PreTrainedTokenizerFast` (with chat template and special tokens) from GGUF metadata."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    reader = _reader(path)
    groups: dict[str, dict[str, Any]] = {}
    for group, renames in GGUF_TOKENIZER_MAPPING.items():
        groups[group] = {name: reader.fields[f"tokenizer.{key}"].contents()
                         for key, name in renames.items() if f"tokenizer.{key}" in reader.fields}
    tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
    if "tokens" not in tokenizer_dict:
        raise CheckpointError(path, "GGUF file carries no tokenizer (tokenizer.ggml.tokens)")
    arch = _field(reader, "general.architecture", path)
    try:
        backend, extra = convert_gguf_tokenizer(arch, tokenizer_dict)
    except Exception as e:
        raise CheckpointError(path, f"cannot build the tokenizer "
                              f"({type(e).__name__}: {e})") from None
    tokens = tokenizer_dict["tokens"]
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unk_token_id"), ("pad_token", "pad_token_id")):
        token_id = tokenizer_dict.get(key)
        if token_id is not None:
            tokenizer_config[name] = tokens[int(token_id)]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
