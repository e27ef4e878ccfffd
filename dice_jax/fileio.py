"""Files: atomic writes (temporary name, then rename) and JSON / JSON Lines reading.

Every artifact is written under a temporary name beside its destination and renamed into
place (`atomic_file`, `atomic_directory`), so a reader never sees half a file and a killed
run leaves nothing half-written under the final name. Readers raise a `DiceError` that
names the file (and, for JSON Lines, the line).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

from dice_jax.errors import CheckpointError, DiceError

WRITE_LOG_ENV = "DICE_JAX_WRITE_LOG"  # a file: every write below is logged there (tests)


def log_write(path: str) -> None:
    """With `DICE_JAX_WRITE_LOG=FILE` set, appends `PROCESS_ID PATH` to FILE, so a test can
    check which process wrote what (a multi-host run has one writer)."""
    log = os.environ.get(WRITE_LOG_ENV)
    if log:
        with open(log, "a") as f:
            f.write(f"{os.environ.get('JAX_PROCESS_ID', '0')} {os.path.abspath(path)}\n")


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
    log_write(destination)
    try:
        yield tmp
        os.rename(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", *, overwrite: bool = True) -> Iterator[IO[Any]]:
    """An open file `path.tmp-<pid>` (text modes: UTF-8), flushed, synced and renamed to
    `path` when the block ends; on any error it is removed and `path` is left as it was.

    `overwrite=False` refuses an existing `path` (DiceError). The parent folder must exist.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file: mode {mode!r} must be 'w' or 'wb'")
    if not overwrite and os.path.lexists(path):
        raise DiceError(f"{path}: already exists; refusing to overwrite")
    tmp = f"{path}.tmp-{os.getpid()}"
    log_write(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str, *, overwrite: bool = True) -> None:
    """Writes `text` (UTF-8) to `path` atomically (`atomic_file`)."""
    with atomic_file(path, "w", overwrite=overwrite) as f:
        f.write(text)


def atomic_write_bytes(path: str, data: bytes, *, overwrite: bool = True) -> None:
    """Writes `data` to `path` atomically (`atomic_file`)."""
    with atomic_file(path, "wb", overwrite=overwrite) as f:
        f.write(data)


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` as indented JSON (keys sorted, ASCII, final newline), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str, rows: Iterable[Any], *, ensure_ascii: bool = False,
                overwrite: bool = True) -> None:
    """Writes one JSON object a line (key order kept; UTF-8 text unless `ensure_ascii`),
    atomically: the JSONL that `datasets.load_dataset("json", ...)` and TRL read."""
    with atomic_file(path, "w", overwrite=overwrite) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=ensure_ascii) + "\n")


def append_jsonl(path: str, row: Any) -> None:
    """Appends one JSON line (keys sorted) to a log such as `metrics.jsonl` (not atomic: a
    line torn by a kill is skipped by `read_jsonl(..., skip_invalid=True)`)."""
    log_write(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def iter_jsonl(path: str, *, skip_invalid: bool = False) -> Iterator[tuple[int, Any]]:
    """`(line number, value)` of each non-blank line of a JSON Lines file.

    A missing file, a non-UTF-8 file or (unless `skip_invalid`) a line that is not JSON
    raise a DiceError naming `path` (and `path:line`).
    """
    return _parse_lines(path, _read_text(path).split("\n"), skip_invalid)


def read_jsonl(path: str, *, skip_invalid: bool = False) -> list[Any]:
    """The values of a JSON Lines file, blank lines skipped (errors: `iter_jsonl`)."""
    return [value for _, value in iter_jsonl(path, skip_invalid=skip_invalid)]


def read_json(path: str) -> Any:
    """The value of a JSON file; a DiceError naming `path` when it is missing or invalid."""
    return _parse_json(path, _read_text(path))


def read_json_rows(path: str) -> list[Any]:
    """Rows of a file holding either a JSON list or JSON Lines (told apart by a leading
    `[`); errors name the file, and the line for JSON Lines."""
    text = _read_text(path)
    if not text.lstrip().startswith("["):
        return [value for _, value in _parse_lines(path, text.split("\n"), False)]
    rows = _parse_json(path, text)
    if not isinstance(rows, list):
        raise DiceError(f"{path}: expected a JSON list of objects")
    return rows


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise DiceError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DiceError(f"{path}: not UTF-8 text ({e})") from None


def _parse_json(path: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DiceError(f"{path}: not valid JSON ({e})") from None


def _parse_lines(path: str, lines: list[str], skip_invalid: bool
                 ) -> Iterator[tuple[int, Any]]:
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as e:
            if not skip_invalid:
                raise DiceError(f"{path}:{line_no}: not valid JSON ({e})") from None
