"""Memory plan: per-device bytes of parameters, gradients and optimizer state on a mesh.

Shapes come from `jax.eval_shape` (nothing is allocated) and the sharding from the same
rule table the trainer uses, so the plan works for any preset on any mesh without the
devices being present:

    python -m dice_jax.training.memory --preset llama3_8b --mesh fsdp=8
    python -m dice_jax.training.memory --preset llama3_8b --mesh data=2,fsdp=4 --grad-accum 4

Gradients are float32 (the train step accumulates in float32); with `grad_accum > 1` the
scan carries one more float32 gradient copy. Activations are not included: they depend on
the batch, length and remat policy (`ModelConfig.remat`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import PartitionSpec

from dice_jax.errors import ConfigError
from dice_jax.models.config import ModelConfig
from dice_jax.models.presets import PRESETS, preset
from dice_jax.sharding import DEFAULT_RULES, MESH_AXES, Rules, abstract_params, logical_to_spec
from dice_jax.training.config import TrainConfig
from dice_jax.training.state import make_optimizer, opt_state_like_params

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class _MeshShape:
    """Stands in for a Mesh where only axis sizes matter (no devices needed)."""

    shape: Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    mesh: dict[str, int]
    num_params: int
    params_bytes: int       # per device
    grads_bytes: int        # per device, float32
    opt_state_bytes: int    # per device
    accum_bytes: int        # per device, float32 accumulation buffer (grad_accum > 1)

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.opt_state_bytes + self.accum_bytes

    def format(self, name: str = "model") -> str:
        rows = [("parameters", self.params_bytes), ("gradients (float32)", self.grads_bytes),
                ("optimizer state", self.opt_state_bytes)]
        if self.accum_bytes:
            rows.append(("gradient accumulator", self.accum_bytes))
        rows.append(("total", self.total_bytes))
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [f"memory plan: {name}, {self.num_params / 1e9:.3f}B parameters, mesh {mesh} "
                 f"({self.devices} devices); per device, activations not included:"]
        lines += [f"  {label:<22s} {b / GIB:9.3f} GiB  ({b / 1e9:8.3f} GB)" for label, b in rows]
        return "\n".join(lines)


def resolve_mesh(axes: Mapping[str, int], num_devices: int | None = None) -> dict[str, int]:
    """Mesh axis sizes with -1 filled from `num_devices` (default: the product of the rest)."""
    sizes = {a: int(axes.get(a, 1)) for a in MESH_AXES}
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
    if -1 in sizes.values():
        known = math.prod(v for v in sizes.values() if v != -1)
        if num_devices is None or num_devices % known:
            raise ValueError(f"mesh {dict(axes)}: cannot fill -1 from {num_devices} devices")
        sizes = {a: (num_devices // known if v == -1 else v) for a, v in sizes.items()}
    return sizes


def _local_bytes(shape: Sequence[int], itemsize: int, spec: PartitionSpec,
                 mesh: Mapping[str, int]) -> int:
    n = itemsize
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        n *= -(-dim // math.prod(mesh[a] for a in axes))
    return n


def memory_plan(model_config: ModelConfig, mesh_axes: Mapping[str, int],
                train_config: TrainConfig | None = None, rules: Rules = DEFAULT_RULES,
                num_devices: int | None = None) -> MemoryPlan:
    """Per-device bytes of params, float32 grads, optimizer state (and the accumulation
    buffer) for `model_config` sharded on a mesh of `mesh_axes` by `rules`."""
    train_config = train_config or TrainConfig()
    mesh = resolve_mesh(mesh_axes, num_devices)
    fake = _MeshShape(mesh)
    boxed = abstract_params(model_config)
    names = nn.get_partition_spec(boxed)
    shapes = nn.unbox(boxed)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    specs = jax.tree.map(lambda n, s: logical_to_spec(tuple(n), s.shape, fake, rules),
                         names, shapes, is_leaf=is_spec)
    fraction = jax.tree.map(
        lambda sp, s: _local_bytes(s.shape, 1, sp, mesh) / max(1, math.prod(s.shape)),
        specs, shapes, is_leaf=is_spec)
    leaves = jax.tree.leaves(shapes)
    fracs = jax.tree.leaves(fraction)
    params_bytes = sum(_local_bytes(s.shape, np.dtype(s.dtype).itemsize, sp, mesh)
                       for s, sp in zip(leaves, jax.tree.leaves(specs, is_leaf=is_spec)))
    grads_bytes = int(sum(math.prod(s.shape) * 4 * f for s, f in zip(leaves, fracs)))
    optimizer = make_optimizer(train_config)
    opt_abstract = jax.eval_shape(optimizer.init, shapes)
    sized = optax_sizes(optimizer, opt_abstract, fraction)
    return MemoryPlan(mesh=mesh, num_params=sum(math.prod(s.shape) for s in leaves),
                      params_bytes=int(params_bytes), grads_bytes=grads_bytes,
                      opt_state_bytes=int(sized),
                      accum_bytes=grads_bytes if train_config.grad_accum > 1 else 0)


def optax_sizes(optimizer: Any, opt_abstract: Any, fraction: Any) -> float:
    """Per-device bytes of an abstract optax state: params-like leaves scaled by their
    parameter's local fraction, other leaves (counters) replicated."""
    mapped = opt_state_like_params(optimizer, opt_abstract, fraction, 1.0)
    total = 0.0
    for s, f in zip(jax.tree.leaves(opt_abstract), jax.tree.leaves(mapped)):
        total += math.prod(s.shape) * np.dtype(s.dtype).itemsize * f
    return total


def parse_mesh(text: str) -> dict[str, int]:
    """`"fsdp=8"` or `"data=2,fsdp=2,tensor=2"` -> axis sizes (missing axes are 1)."""
    axes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        if name not in MESH_AXES or not size.lstrip("-").isdigit():
            raise ConfigError(f"--mesh: bad mesh entry {part!r}; use e.g. fsdp=8 with "
                              f"axes {MESH_AXES}")
        axes[name] = int(size)
    return axes


def _define(fv: Any) -> None:
    from absl import flags

    flags.DEFINE_enum("preset", None, sorted(PRESETS), "model shape", flag_values=fv)
    flags.DEFINE_string("mesh", "fsdp=-1", "axis sizes, e.g. fsdp=8 or data=2,fsdp=2,tensor=2",
                        flag_values=fv)
    flags.DEFINE_integer("devices", None, "fills a -1 axis", flag_values=fv)
    flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                      "master-weight dtype", flag_values=fv)
    flags.DEFINE_integer("grad_accum", 1, "micro-batches per step", lower_bound=1,
                         flag_values=fv)


def _run(fv: Any, positional: list[str]) -> int:
    if positional:
        raise ConfigError(f"no positional arguments expected, got {positional}; see --help")
    if fv.preset is None:
        raise ConfigError(f"--preset is required, one of {sorted(PRESETS)}; see --help")
    config = preset(fv.preset, param_dtype=fv.param_dtype)
    cfg = TrainConfig(grad_accum=fv.grad_accum, batch_size=fv.grad_accum)
    try:
        plan = memory_plan(config, parse_mesh(fv.mesh), cfg, num_devices=fv.devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(plan.format(fv.preset))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dice_jax.training.memory --preset NAME [--mesh fsdp=8] ...`."""
    from dice_jax.cli import run_main

    return run_main(_run, argv, "python -m dice_jax.training.memory",
                    __doc__.split("\n\n")[0], _define)


if __name__ == "__main__":
    sys.exit(main())
