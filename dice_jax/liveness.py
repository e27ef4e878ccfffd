"""A lost process stops a multi-process run with one clear line, not a hang or a core dump.

When one process of a job dies (killed, out of memory, its host gone), the others wait in
a collective that cannot complete; JAX's own heartbeat (`distributed.HEARTBEAT_SECONDS`)
then aborts them from C++ with a page of log text. This module speaks first: each process
runs a daemon thread that bumps its own counter in the job's key-value store every
`BEAT_SECONDS` and reads the others'. A peer whose counter has not moved for
`LOST_AFTER_SECONDS` (less than JAX's heartbeat) is lost: the thread writes one line
`error: process N of M stopped answering ...` to stderr and ends this process with exit
code `EXIT_CODE` (the main thread may be blocked in that collective, so it cannot raise).
A process that ends on purpose (done, a config error, SIGTERM) marks itself `done` first,
so its peers let it go.

The key-value store is reached through JAX's distributed client, which the public API
does not expose; without it (another JAX version) there is no watchdog and JAX's own
heartbeat still ends the run.
"""

import os
import sys
import threading
import time
from typing import Any

BEAT_SECONDS = 3.0
LOST_AFTER_SECONDS = 30.0  # < distributed.HEARTBEAT_SECONDS: this check speaks first
EXIT_CODE = 3
_PREFIX = "dice_jax/alive/"
_DONE = "done"
_state: dict[str, Any] = {}


def _client() -> Any:
    try:
        from jax._src import distributed

        return distributed.global_state.client
    except (ImportError, AttributeError):
        return None


def start(process_id: int, num_processes: int) -> bool:
    """Starts this process's watchdog (once); returns whether one runs."""
    client = _client()
    if client is None or num_processes < 2 or "thread" in _state:
        return False
    stop_event = threading.Event()
    thread = threading.Thread(target=_watch, args=(client, process_id, num_processes,
                                                   stop_event),
                              name="dice-jax-liveness", daemon=True)
    _state.update(client=client, process_id=process_id, stop=stop_event, thread=thread)
    thread.start()
    return True


def mark_done() -> None:
    """This process ends on purpose: its peers stop watching it; its watchdog stops."""
    if "thread" not in _state:
        return
    _state["stop"].set()
    try:
        _state["client"].key_value_set(f"{_PREFIX}{_state['process_id']}", _DONE,
                                       allow_overwrite=True)
    except Exception:  # the job is already gone: nobody is left to watch us
        pass


def lost_peers(beats: dict[int, str], last_change: dict[int, float], now: float
               ) -> list[int]:
    """Peers whose counter (`beats`, "done" for a finished peer) has not changed since
    `last_change` for `LOST_AFTER_SECONDS` at time `now`."""
    return sorted(p for p, beat in beats.items()
                  if beat != _DONE and now - last_change[p] > LOST_AFTER_SECONDS)


def _watch(client: Any, me: int, count: int, stop: threading.Event) -> None:
    peers = [p for p in range(count) if p != me]
    beats: dict[int, str] = {p: "" for p in peers}
    start = time.monotonic()
    last_change = {p: start for p in peers}
    counter = 0
    while not stop.wait(BEAT_SECONDS if counter else 0.0):
        counter += 1
        now = time.monotonic()
        try:
            client.key_value_set(f"{_PREFIX}{me}", str(counter), allow_overwrite=True)
            for p in peers:
                try:
                    beat = client.key_value_try_get(f"{_PREFIX}{p}")
                except Exception:  # not written yet
                    beat = ""
                if beat != beats[p]:
                    beats[p], last_change[p] = beat, now
        except Exception:  # the coordination service itself is gone: JAX reports that
            return
        lost = lost_peers(beats, last_change, now)
        if lost and not stop.is_set():
            names = ", ".join(str(p) for p in lost)
            sys.stderr.write(
                f"\nerror: process {names} of {count} stopped answering for "
                f"{LOST_AFTER_SECONDS:.0f} s (killed, out of memory or its host lost); "
                f"process {me} stops too. Run the same launch command on every host to "
                "resume from the last completed stage or checkpoint\n")
            sys.stderr.flush()
            os._exit(EXIT_CODE)
