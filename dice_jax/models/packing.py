"""Packed tokens: the real tokens of a padded `[rows, length]` batch, without the padding.

A forward over a padded batch spends its weight matmuls (projections, MLP, vocabulary
projection) on padding slots too. The decoder can instead run those per-token parts over
the real tokens only, stored packed as `[shards, capacity // shards]` (row-major order of
the padded batch, then `capacity - tokens` padding entries at the end), and move to the
padded layout only around attention, which needs each row's tokens together.

`Packing` holds the two index maps (built on the host from the padding mask), and
`pack` / `unpack` move arrays between the layouts with gathers (entries without a
counterpart read 0). `shards` is the mesh's data-parallel size, so the packed axis 0
shards like a batch axis.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Packing(NamedTuple):
    """Index maps between a padded batch `[rows, length]` and its packed tokens.

    `token_slot` int32 `[shards, capacity // shards]`: the padded slot (`row * length +
    column`) of each packed token, `rows * length` (out of range) for packing padding.
    `slot_token` int32 `[rows, length]`: the packed index (into the flattened packed axes)
    of the token at each slot, `capacity` (out of range) for a padding slot.
    """

    token_slot: Array | np.ndarray
    slot_token: Array | np.ndarray


def packed_capacity(tokens: int, shards: int = 1, step: int = 128) -> int:
    """The packed size for `tokens` real tokens: the next multiple of `step * shards`
    (at least one step), so that the batches of a run share few shapes."""
    multiple = step * max(1, shards)
    return max(multiple, -(-int(tokens) // multiple) * multiple)


def packing_from_mask(mask: np.ndarray, capacity: int, shards: int = 1) -> Packing:
    """The `Packing` of the nonzero slots of `mask` (int/bool `[rows, length]`).

    Raises ValueError when the mask has more real tokens than `capacity`, or when
    `capacity` is not a multiple of `shards`."""
    mask = np.asarray(mask) != 0
    rows, length = mask.shape
    slots = np.flatnonzero(mask)
    if len(slots) > capacity:
        raise ValueError(f"{len(slots)} real tokens do not fit a packed capacity of {capacity}")
    if capacity % max(1, shards):
        raise ValueError(f"packed capacity {capacity} is not a multiple of {shards} shards")
    token_slot = np.full(capacity, rows * length, np.int32)
    token_slot[:len(slots)] = slots
    slot_token = np.full(rows * length, capacity, np.int32)
    slot_token[slots] = np.arange(len(slots), dtype=np.int32)
    return Packing(token_slot.reshape(max(1, shards), -1), slot_token.reshape(rows, length))


def pack(padded: Array, packing: Packing) -> Array:
    """`padded [rows, length, ...]` -> `[shards, capacity // shards, ...]` (0 at the
    packing padding)."""
    rows, length = packing.slot_token.shape
    flat = padded.reshape(rows * length, *padded.shape[2:])
    return jnp.take(flat, packing.token_slot, axis=0, mode="fill", fill_value=0)


def unpack(packed: Array, packing: Packing) -> Array:
    """`packed [shards, capacity // shards, ...]` -> `[rows, length, ...]` (0 at the
    padding slots)."""
    s, c = packing.token_slot.shape
    flat = packed.reshape(s * c, *packed.shape[2:])
    return jnp.take(flat, packing.slot_token, axis=0, mode="fill", fill_value=0)
