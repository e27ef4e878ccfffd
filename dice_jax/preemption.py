"""SIGTERM (preemption): finish the step in progress, checkpoint it, exit with a message.

TPU VMs and SLURM send SIGTERM before they take a host away. Inside training the signal
only sets a flag; after the step in progress every process asks whether any process got
it (one small all-gather), all save a checkpoint of that step together and stop with
`Preempted`. Outside training it stops the run at once: the stage in progress was never
renamed into place, so the same command redoes it. Either way the same command resumes
with no training step lost.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from dice_jax.errors import DiceError

EXIT_CODE = 143  # 128 + SIGTERM, as a shell reports a process ended by it


class Preempted(DiceError):
    """The run stopped on SIGTERM; the same command resumes it."""

    exit_code = EXIT_CODE


_state = {"requested": False, "deferring": False}


def _handler(signum: int, frame: Any) -> None:
    _state["requested"] = True
    if not _state["deferring"]:
        raise Preempted("SIGTERM: stopped; the stage in progress is redone when the same "
                        "command runs again")


def install() -> None:
    """Routes SIGTERM to this module (from the main thread; elsewhere it does nothing)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)
        _state["requested"] = False


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block a SIGTERM is only recorded (`requested()` reports it)."""
    before = _state["deferring"]
    _state["deferring"] = True
    try:
        yield
    finally:
        _state["deferring"] = before


def requested() -> bool:
    """Whether any process has received SIGTERM (a collective: every process must ask at
    the same point)."""
    from dice_jax.distributed import all_processes

    return bool(np.any(all_processes(np.asarray(_state["requested"]))))
