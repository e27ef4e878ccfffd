"""Streams tensors one at a time onto their target devices to build a parameter tree.

Host memory holds one tensor (one layer's slice of a stacked parameter) at a time: a
stacked parameter is first allocated on its sharding, then each layer is written into it
by a jitted update that donates the old buffer. An 8B model therefore never exists twice
in host memory, nor twice on device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dice_jax.checkpoints.mapping import hf_names, rules_for
from dice_jax.errors import CheckpointError
from dice_jax.models.config import ModelConfig
from dice_jax.sharding import param_shardings

# read(hf_name) -> (array in HF layout, name of the file it came from)
TensorReader = Callable[[str], tuple[np.ndarray, str]]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _zeros(shape: tuple[int, ...], dtype: Any, sharding: Any) -> jax.Array:
    return jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), sharding)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack: jax.Array, index: jax.Array, value: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stack, value.astype(stack.dtype), index, 0)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def place_params(read: TensorReader, config: ModelConfig, shardings: Any | None = None,
                 desc: str = "import") -> dict:
    """Builds the parameter tree of `config` from HF-named tensors.

    `shardings` is a tree of `jax.sharding.Sharding` like the params (default: one device).
    Each tensor's shape is checked against the config; a mismatch raises CheckpointError
    naming the file and tensor. Values are cast to `config.param_dtype`.
    """
    shardings = shardings if shardings is not None else param_shardings(config)
    dtype = jnp.dtype(config.param_dtype)
    rules = rules_for(config)
    params: dict = {}
    total = sum(len(hf_names(r, config)) for r in rules)
    with tqdm(total=total, desc=desc, unit="tensor", leave=False) as bar:
        for rule in rules:
            sharding = _get(shardings, rule.path)
            expected = rule.hf_shape(config)
            stack = None
            for i, name in enumerate(hf_names(rule, config)):
                array, source = read(name)
                if tuple(array.shape) != expected:
                    raise CheckpointError(source, f"tensor {name!r} has shape "
                                          f"{tuple(array.shape)}, the model config implies "
                                          f"{expected}")
                value = np.asarray(rule.to_ours(array, config))
                if not rule.stacked:
                    _set(params, rule.path, jax.device_put(value.astype(dtype), sharding))
                else:
                    if stack is None:
                        shape = (config.num_layers, *value.shape)
                        stack = _zeros(shape, dtype, sharding)
                    stack = _set_layer(stack, jnp.int32(i), value)
                bar.update(1)
                del array, value
            if stack is not None:
                _set(params, rule.path, stack)
    return params


def iter_hf_tensors(params: dict, config: ModelConfig):
    """Yields `(hf_name, numpy array in HF layout)` one tensor at a time (for export).

    Only one layer slice is fetched to the host at a time.
    """
    for rule in rules_for(config):
        leaf = _get(params, rule.path)
        for i, name in enumerate(hf_names(rule, config)):
            value = leaf[i] if rule.stacked else leaf
            yield name, rule.to_hf(np.asarray(jax.device_get(value)), config)
