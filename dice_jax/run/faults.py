"""Fault injection for the resume tests: a real SIGKILL at a named point of a run.

Setting `DICE_JAX_KILL_AT=POINT` (e.g. `round_1/sample:written`, `round_1/train:step=3`)
makes the run kill itself with SIGKILL, which no Python code can intercept, when it
reaches POINT: the same state a `kill -9` or a lost machine leaves. `DICE_JAX_TERM_AT=POINT`
sends SIGTERM instead, as a preempting scheduler does. Unset, they do nothing.
"""

from __future__ import annotations

import os
import signal
import sys

KILL_ENV = "DICE_JAX_KILL_AT"
TERM_ENV = "DICE_JAX_TERM_AT"  # the same, with SIGTERM (a preemption notice)


def kill_point(point: str) -> None:
    """SIGKILLs this process if `DICE_JAX_KILL_AT` names `point`; sends it SIGTERM if
    `DICE_JAX_TERM_AT` does."""
    if os.environ.get(KILL_ENV) == point:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(TERM_ENV) == point:
        os.kill(os.getpid(), signal.SIGTERM)
