"""Atomic writes: every artifact is written under a temporary name and renamed into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from dice_jax.errors import CheckpointError


@contextlib.contextmanager
def atomic_directory(destination: str) -> Iterator[str]:
    """Yields a temporary folder beside `destination`, renamed to it on success.

    Refuses an existing destination; on any error the temporary folder is removed, so
    nothing half-written is ever left at `destination`.
    """
    destination = os.path.abspath(destination)
    if os.path.lexists(destination):
        raise CheckpointError(destination, "destination already exists; refusing to overwrite")
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(destination)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result is an ordinary folder
    try:
        yield tmp
        os.rename(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` as indented JSON to `path` via a temporary file and rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
