"""Hugging Face folders: import (safetensors, single or sharded) and export.

An exported folder holds `config.json`, `generation_config.json`, safetensors shards with
their index, and the tokenizer files; `transformers.AutoModelForCausalLM.from_pretrained`
loads it with no missing or unexpected keys.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dice_jax.checkpoints.mapping import IGNORED_HF_SUFFIXES, hf_names, rules_for
from dice_jax.checkpoints.placement import iter_hf_tensors, place_params
from dice_jax.errors import CheckpointError
from dice_jax.fileio import atomic_directory, read_json, write_json
from dice_jax.models.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _weight_map(folder: str) -> dict[str, str]:
    """HF tensor name -> safetensors file path, from the index or the single file."""
    index = os.path.join(folder, INDEX_FILE)
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(index):
        try:
            mapping = read_json(index)["weight_map"]
        except (KeyError, TypeError) as e:
            raise CheckpointError(index, f"not a safetensors index ({e})") from None
        return {name: os.path.join(folder, file) for name, file in mapping.items()}
    if os.path.isfile(single):
        names = _open(single).keys()
        return {name: single for name in names}
    others = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {others[0]}: convert PyTorch pickles to safetensors first)" if others else ""
    raise CheckpointError(folder, f"no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _open(path: str) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(path, "file not found")
    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"unreadable or truncated safetensors file ({e})") from None


def import_hf_folder(folder: str, shardings: Any | None = None,
                     **config_overrides: Any) -> tuple[dict, ModelConfig]:
    """Params and config from an HF folder, streamed tensor by tensor onto `shardings`."""
    if not os.path.isdir(folder):
        raise CheckpointError(folder, "not a directory")
    config = ModelConfig.from_hf_file(os.path.join(folder, "config.json"), **config_overrides)
    weight_map = _weight_map(folder)
    handles: dict[str, Any] = {}

    def read(name: str) -> tuple[np.ndarray, str]:
        if name not in weight_map:
            raise CheckpointError(folder, f"tensor {name!r} is missing from the checkpoint")
        path = weight_map[name]
        if path not in handles:
            handles[path] = _open(path)
        try:
            return handles[path].get_tensor(name), path
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(path, f"cannot read tensor {name!r} ({e})") from None

    expected = {n for r in rules_for(config) for n in hf_names(r, config)}
    extra = sorted(n for n in weight_map if n not in expected
                   and not n.endswith(IGNORED_HF_SUFFIXES)
                   and not (n == "lm_head.weight" and config.tie_word_embeddings))
    if extra:
        raise CheckpointError(folder, f"{len(extra)} unexpected tensor(s), e.g. {extra[:3]}: "
                              "the weights do not match config.json")
    params = place_params(read, config, shardings, desc=f"import {os.path.basename(folder)}")
    return params, config


def download_hub_model(repo_id: str, revision: str | None = None) -> str:
    """Downloads config, safetensors and tokenizer files of a hub model; returns the folder."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # the hub client raises many types; all mean "not available"
        raise CheckpointError(repo_id, f"cannot download from the Hugging Face hub "
                              f"({type(e).__name__}: {e})") from None


def _plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def export_hf_folder(params: dict, config: ModelConfig, destination: str, tokenizer: Any = None,
                     max_shard_bytes: int = 5 * 2**30, dtype: str | None = None) -> str:
    """Writes an HF folder at `destination` (which must not exist), atomically.

    `dtype` (default: the config's `param_dtype`) is the stored tensor dtype. The host holds
    at most one shard of tensors at a time.
    """
    import ml_dtypes

    np_dtype = np.dtype(ml_dtypes.bfloat16) if (dtype or config.param_dtype) == "bfloat16" \
        else np.dtype(np.float32)
    names = [n for r in rules_for(config) for n in hf_names(r, config)]
    sizes = []
    for rule in rules_for(config):
        nbytes = int(np.prod(rule.hf_shape(config))) * np_dtype.itemsize
        sizes += [(n, nbytes) for n in hf_names(rule, config)]
    shards = _plan_shards(sizes, max_shard_bytes)
    files = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    shard_of = {n: k for k, shard in enumerate(shards) for n in shard}
    with atomic_directory(destination) as tmp:
        hf_config = config.replace(param_dtype=dtype or config.param_dtype).to_hf_dict()
        write_json(os.path.join(tmp, "config.json"), hf_config)
        eos = list(config.eos_token_ids)
        write_json(os.path.join(tmp, "generation_config.json"), {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": config.pad_token_id,
        })
        pending: dict[str, np.ndarray] = {}
        current = 0
        for name, array in iter_hf_tensors(params, config):
            pending[name] = np.ascontiguousarray(array.astype(np_dtype))
            if len(pending) == len(shards[current]):
                save_file(pending, os.path.join(tmp, files[current]), metadata={"format": "pt"})
                pending, current = {}, current + 1
        if len(shards) > 1:
            write_json(os.path.join(tmp, INDEX_FILE), {
                "metadata": {"total_size": sum(s for _, s in sizes)},
                "weight_map": {n: files[shard_of[n]] for n in names}})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return destination
