"""Several processes, one program: joining the job, one writer, agreement, host gathers.

A multi-host run is one SPMD program: every process runs the same stages on its own
devices, one global mesh spans them all. This module holds what that needs outside the
math:

- `initialize_from_environment`: joins the job from `JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (and optional `JAX_LOCAL_DEVICE_IDS`), or from a
  cluster JAX detects itself (SLURM, Open MPI, TPU pod slices); a single process needs
  none of it. A launch that cannot work is a ConfigError before any work.
- `is_writer`: process 0 writes the run folder; the others compute and write nothing
  there except their shards of orbax checkpoints, which orbax saves collectively.
- `barrier`, `agree`: every process waits at the same named point; host-side values that
  must be equal on every process (data, pairs, the manifest) are compared by fingerprint.
- `host_array`: a global array's values on this host, gathered across processes in
  index order (so no artifact depends on the number of processes).
"""

import hashlib
import json
import logging
import os
from typing import Any

import jax
import numpy as np

from dice_jax.errors import ConfigError, DiceError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"
# JAX's heartbeat: a process that stops answering is declared dead after this long, and
# the others stop with an error naming it instead of waiting forever.
HEARTBEAT_SECONDS = 60


def _int_env(name: str, environ: dict[str, str]) -> int | None:
    text = environ.get(name)
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not an integer") from None


def launch_settings(environ: dict[str, str] | None = None) -> dict[str, Any] | None:
    """`jax.distributed.initialize` arguments from the environment, None for a single
    process, `{}` for JAX's own cluster detection. Raises ConfigError for a launch that
    cannot work (a process count without a coordinator, an id out of range, ...)."""
    env = dict(os.environ if environ is None else environ)
    address = env.get(ENV_COORDINATOR, "").strip() or None
    num = _int_env(ENV_NUM_PROCESSES, env)
    pid = _int_env(ENV_PROCESS_ID, env)
    local_text = env.get(ENV_LOCAL_DEVICE_IDS, "").strip()
    if address is None:
        if num is not None or pid is not None or local_text:
            raise ConfigError(f"{ENV_NUM_PROCESSES} / {ENV_PROCESS_ID} are set but "
                              f"{ENV_COORDINATOR} is not: every process needs the "
                              "coordinator's host:port")
        if _cluster_detected(env):
            return {}
        return None
    if num is None or num < 1:
        raise ConfigError(f"{ENV_COORDINATOR} is set: {ENV_NUM_PROCESSES} must be a "
                          f"positive integer, not {env.get(ENV_NUM_PROCESSES)!r}")
    if pid is None or not 0 <= pid < num:
        raise ConfigError(f"{ENV_PROCESS_ID}={env.get(ENV_PROCESS_ID)!r} must lie in "
                          f"[0, {num}) for {ENV_NUM_PROCESSES}={num}")
    if ":" not in address:
        raise ConfigError(f"{ENV_COORDINATOR}={address!r}: expected host:port")
    settings: dict[str, Any] = {"coordinator_address": address, "num_processes": num,
                                "process_id": pid}
    if local_text:
        try:
            settings["local_device_ids"] = [int(x) for x in local_text.split(",")]
        except ValueError:
            raise ConfigError(f"{ENV_LOCAL_DEVICE_IDS}={local_text!r}: expected "
                              "comma-separated integers") from None
    return settings


def _cluster_detected(env: dict[str, str]) -> bool:
    """A cluster environment JAX's `initialize()` detects with several processes."""
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    return int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1


def initialize_from_environment(environ: dict[str, str] | None = None) -> bool:
    """Joins the multi-process job the environment describes; returns whether it did.
    Call before anything touches a JAX device."""
    settings = launch_settings(environ)
    if settings is None:
        return False
    # CPU devices need a collectives backend across processes (accelerators bring their
    # own); the setting touches only the CPU client, and no device may be touched first.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**settings, heartbeat_timeout_seconds=HEARTBEAT_SECONDS)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"joining the multi-process job failed: {e}") from None
    from dice_jax import liveness

    liveness.start(jax.process_index(), jax.process_count())
    return True


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_writer() -> bool:
    """Whether this process writes the run folder (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def fingerprint(value: Any) -> str:
    """A short hash of a JSON-able value or of numpy arrays (sorted keys, exact bytes)."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()[:32]


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, np.ndarray):
        h.update(f"{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        for key in sorted(value):
            h.update(repr(key).encode())
            _feed(h, value[key])
    elif isinstance(value, list | tuple):
        h.update(f"[{len(value)}".encode())
        for item in value:
            _feed(h, item)
    else:
        h.update(json.dumps(value, sort_keys=True, default=str).encode())


def agree(what: str, value: Any) -> None:
    """Checks that `value` is the same on every process (by fingerprint); a mismatch stops
    the run with an error naming `what` instead of training on different data."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(bytes.fromhex(fingerprint(value)), np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(digest))
    differ = [i for i in range(everyone.shape[0]) if not np.array_equal(everyone[i], digest)]
    if differ:
        raise DiceError(f"{what} differs between processes (process {jax.process_index()} vs "
                        f"{differ}); every process must see the same inputs and run_dir")


def broadcast(value: Any) -> Any:
    """Process 0's value of a small numpy array / scalar, on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(value)


def all_processes(value: Any) -> list[Any]:
    """A small numpy value of every process, in process order."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    return list(np.asarray(multihost_utils.process_allgather(np.asarray(value))))


def host_array(x: Any) -> np.ndarray:
    """The full value of a (possibly multi-process) array on this host, in index order."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def host_tree(tree: Any) -> Any:
    """`host_array` over a pytree."""
    return jax.tree.map(host_array, tree)


def put_global(array: Any, sharding: Any) -> jax.Array:
    """A host array that every process holds in full, placed on a (possibly multi-process)
    sharding: each process hands JAX only the shards its devices hold."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        return jax.device_put(array, sharding)  # already global: a collective reshard
    array = np.asarray(array)
    if sharding.is_fully_addressable:
        return jax.device_put(array, sharding)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def quiet_other_processes() -> None:
    """Processes other than 0 log warnings and errors only, with their index."""
    if jax.process_index() == 0:
        return
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s [process {jax.process_index()}] %(name)s: %(message)s",
            "%H:%M:%S"))
    os.environ["TQDM_DISABLE"] = "1"
