"""Progress bars: on by default, off per call (`progress=False`) or for a whole process
(`TQDM_DISABLE=1`, which `python -m dice_jax.train --quiet` sets)."""

from __future__ import annotations

import os


def bar_disabled(enabled: bool = True) -> bool:
    """The `disable=` argument for tqdm: True when the caller or the environment says so."""
    return not enabled or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
