"""Device meshes, the map from logical axis names to mesh axes, and placement helpers.

Every parameter and activation of the decoder is named with logical axes (`embed`, `heads`,
`kv_heads`, `mlp`, `vocab`, `layers`, `batch`, `length`, ...). A rule table maps each logical
name to zero or more mesh axes (`data`, `fsdp`, `tensor`). A dimension whose size the mesh
axes do not divide (SmolLM2's 3 KV heads over tensor=2) is replicated rather than failing.

Placement: `replicated`, `batch_sharding` and `put_process_local` place host batches (rows
over the rules' `batch` mesh axes); `MeshFunction` jits a function that runs inside a mesh
and the logical-axis rules (training steps and scoring use it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dice_jax.models.config import ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, Any]]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
)


def make_mesh(axes: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes `data`, `fsdp`, `tensor`.

    One size may be -1 and takes the devices left over, e.g. `{'data': 1, 'fsdp': -1,
    'tensor': 1}`. Raises ValueError when the sizes do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    axes = dict(axes or {"data": 1, "fsdp": -1, "tensor": 1})
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
    sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {axes}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or len(devices) % known:
            raise ValueError(f"mesh {axes} does not fit {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices) or min(sizes) < 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                         f"devices, {len(devices)} available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """A PartitionSpec for an array of `shape` named `names`, each mesh axis used once."""
    table = dict(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for name, size in zip(names, shape):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def abstract_params(config: ModelConfig) -> Any:
    """Shapes, dtypes and logical names of a model's parameters, allocating nothing."""
    from dice_jax.models.decoder import Decoder

    ids = jax.ShapeDtypeStruct((1, 1), np.int32)
    init = lambda key, x: Decoder(config).init(key, x, x, x)  # noqa: E731
    return jax.eval_shape(init, jax.random.key(0), ids)["params"]


def param_shardings(config: ModelConfig, mesh: Mesh | None = None,
                    rules: Rules = DEFAULT_RULES) -> Any:
    """A NamedSharding per parameter (a single-device mesh when `mesh` is None)."""
    mesh = mesh or make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    boxed = abstract_params(config)
    specs = nn.get_partition_spec(boxed)
    shapes = nn.unbox(boxed)
    return jax.tree.map(lambda names, leaf: NamedSharding(
        mesh, logical_to_spec(tuple(names), leaf.shape, mesh, rules)), specs, shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_shapes(config: ModelConfig) -> Any:
    """`jax.ShapeDtypeStruct` per parameter, unboxed."""
    return nn.unbox(abstract_params(config))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names.

    A no-op unless a mesh is set (`jax.set_mesh`); the rules are flax's active
    `nn.logical_axis_rules` (default `DEFAULT_RULES`). Unlike flax's own constraint, a
    dimension the mesh cannot divide is replicated rather than raising.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    rules = nn.get_logical_axis_rules() or DEFAULT_RULES
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array held whole on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, shape: tuple[int, ...], batch_axis: int,
                   rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a host batch array: axis `batch_axis` over the rules' `batch` mesh axes
    (replicated when they do not divide it), the other axes replicated."""
    names: list[str | None] = [None] * len(shape)
    names[batch_axis] = "batch"
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def put_process_local(array: Any, sharding: NamedSharding, batch_axis: int) -> jax.Array:
    """Places a GLOBAL host batch as a global jax.Array, handing JAX only this process's
    slice along `batch_axis` (`jax.make_array_from_process_local_data`), so the same code
    serves a multi-host job where each host loads its own rows. Assumes each process's
    devices hold a contiguous range of the batch axis (true for meshes built by
    `make_mesh`, whose batch axes run over processes first)."""
    array = np.asarray(array)
    index_map = sharding.addressable_devices_indices_map(array.shape)
    starts, stops = [], []
    for index in index_map.values():
        sl = index[batch_axis]
        starts.append(sl.start or 0)
        stops.append(array.shape[batch_axis] if sl.stop is None else sl.stop)
    lo, hi = min(starts), max(stops)
    local = np.take(array, np.arange(lo, hi), axis=batch_axis)
    return jax.make_array_from_process_local_data(sharding, local, array.shape)


class MeshFunction:
    """A jitted function that is traced and run inside the mesh and the logical-axis rules
    (so the decoder's activation constraints apply)."""

    def __init__(self, fn: Callable, mesh: Mesh, rules: Rules, **jit_kwargs: Any) -> None:
        self.mesh, self.rules = mesh, rules
        self.jitted = jax.jit(fn, **jit_kwargs)

    def __call__(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted(*args)

    def lower(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted.lower(*args)
