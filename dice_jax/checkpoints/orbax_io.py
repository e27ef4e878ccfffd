"""dice-jax checkpoints: parameters in orbax format beside the model config and tokenizer.

Layout of a checkpoint folder:

    dice_checkpoint.json   {"format": "dice-jax", "version": 1, "model_config": {...}}
    params/                orbax StandardCheckpointer tree (sharded, restorable on any mesh)
    tokenizer/             tokenizer files (`save_pretrained`), chat template included
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from dice_jax.errors import CheckpointError
from dice_jax.fileio import atomic_directory, read_json, write_json
from dice_jax.models.config import ModelConfig
from dice_jax.sharding import param_shapes, param_shardings

MARKER = "dice_checkpoint.json"
FORMAT_VERSION = 1


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def save_checkpoint(params: dict, config: ModelConfig, destination: str,
                    tokenizer: Any = None) -> str:
    """Writes a dice-jax checkpoint at `destination` (which must not exist), atomically.

    With several processes every process calls this (orbax saves the shards collectively
    into one folder on a shared file system) and process 0 writes the rest and renames."""
    if jax.process_count() == 1:
        with atomic_directory(destination) as tmp:
            _write_checkpoint(params, config, tmp, tokenizer)
        return destination
    from dice_jax.distributed import barrier, is_writer

    tmp = f"{destination}.tmp-shared"
    if is_writer():
        if os.path.lexists(destination):
            raise CheckpointError(destination, "destination already exists; refusing to "
                                  "overwrite")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(f"save {destination}")
    _write_checkpoint(params, config, tmp, tokenizer if is_writer() else None,
                      marker=is_writer())
    barrier(f"saved {destination}")
    if is_writer():
        os.rename(tmp, destination)
    barrier(f"renamed {destination}")
    return destination


def _write_checkpoint(params: dict, config: ModelConfig, folder: str, tokenizer: Any,
                      marker: bool = True) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(folder, "params"), params)
    checkpointer.wait_until_finished()
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    if marker:
        write_json(os.path.join(folder, MARKER), {
            "format": "dice-jax", "version": FORMAT_VERSION,
            "model_config": json.loads(config.to_json())})


def read_checkpoint_config(path: str) -> ModelConfig:
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        raise CheckpointError(path, f"not a dice-jax checkpoint (no {MARKER})")
    meta = read_json(marker)
    if not isinstance(meta, dict):
        raise CheckpointError(marker, "not a JSON object")
    if meta.get("format") != "dice-jax" or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(marker, f"unsupported checkpoint format {meta.get('format')!r} "
                              f"version {meta.get('version')!r}")
    return ModelConfig.from_json(json.dumps(meta.get("model_config")), source=marker)


def load_checkpoint(path: str, shardings: Any | None = None,
                    **config_overrides: Any) -> tuple[dict, ModelConfig]:
    """Params (restored straight onto `shardings`, default one device) and config.

    `config_overrides` may change numerics (`dtype`, `param_dtype`, `remat`), not shapes.
    """
    config = read_checkpoint_config(path).replace(**config_overrides)
    shardings = shardings if shardings is not None else param_shardings(config)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          param_shapes(config), shardings)
    params_dir = os.path.join(os.path.abspath(path), "params")
    if not os.path.isdir(params_dir):
        raise CheckpointError(params_dir, "missing parameter folder")
    try:
        params = ocp.StandardCheckpointer().restore(params_dir, target)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        raise CheckpointError(params_dir, f"cannot restore parameters ({e})") from None
    return params, config


def load_checkpoint_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    folder = os.path.join(path, "tokenizer")
    if not os.path.isdir(folder):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise CheckpointError(folder, f"cannot load the tokenizer ({type(e).__name__})") from None
