"""Training metrics of a run: JSONL (one object per step) and TensorBoard event files.

Metric names are TRL's (`loss`, `rewards/chosen`, `rewards/margins`, ...), so curves from
dice-jax and from a TRL run can be overlaid. TensorBoard files are written with
`tensorboardX` (no TensorFlow needed); `tensorboard --logdir RUN_DIR` shows every round.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from dice_jax.fileio import append_jsonl, read_jsonl


def _summary_writer() -> type:
    """tensorboardX's `SummaryWriter`, imported without torch.

    Its writer module imports torch whenever torch is installed, only to accept torch
    tensors, which dice-jax never passes; runtime code never imports torch (seconds of
    start-up and a second tensor library in memory). A `None` entry in `sys.modules`
    makes that optional import fail as if torch were absent.
    """
    if "torch" in sys.modules or "tensorboardX.writer" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends step records to `folder/metrics.jsonl` (unless `jsonl=False`: the trainer
    writes its own) and `folder/tensorboard/`.

    `prefix` (e.g. "round_1") is put before every TensorBoard tag so that the rounds of a
    run are separate curves. A resumed stage appends; the steps it repeats are not
    repeated in the file because a restarted trainer starts after its last checkpoint.
    """

    def __init__(self, folder: str, prefix: str = "", jsonl: bool = True) -> None:
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, "metrics.jsonl") if jsonl else None
        self.prefix = prefix.rstrip("/")
        self._tb = _summary_writer()(os.path.join(folder, "tensorboard"), flush_secs=10)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        if self.path is not None:
            append_jsonl(self.path, record)
        for name, value in record.items():
            if name != "step" and isinstance(value, int | float):
                tag = f"{self.prefix}/{name}" if self.prefix else name
                self._tb.add_scalar(tag, float(value), step)

    def close(self) -> None:
        self._tb.flush()
        self._tb.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` (missing file: none); a torn last line (killed
    while writing) is skipped."""
    return read_jsonl(path, skip_invalid=True) if os.path.isfile(path) else []
