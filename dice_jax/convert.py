"""Convert checkpoints: HF folder / hub id / GGUF -> dice-jax (orbax), and dice-jax -> HF.

    python -m dice_jax.convert SRC DST [--to dice|hf] [--dtype float32|bfloat16]

SRC is an HF folder, a hub id (`org/name`, network needed), a `.gguf` file, a dice-jax
checkpoint folder, or `embedded:smollm2`. By default a dice-jax checkpoint becomes an HF
folder and anything else becomes a dice-jax checkpoint. DST must not exist; it is written
under a temporary name and renamed, so a failed run leaves nothing behind. Errors print
one line naming the file at fault and exit with code 2.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

from dice_jax.cli import run_main
from dice_jax.errors import ConfigError

_SIZE_UNITS = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}


def parse_size(text: str) -> int:
    """'5GB' -> 5368709120; plain integers are bytes."""
    t = text.strip().upper()
    unit = next((u for u in _SIZE_UNITS if t.endswith(u)), "")
    number, factor = t[: len(t) - len(unit)].strip(), _SIZE_UNITS.get(unit, 1)
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise ConfigError(f"--max_shard_size: bad size {text!r}; e.g. 5GB, 500MB") from None
    if value <= 0:
        raise ConfigError(f"--max_shard_size: size must be positive, got {text!r}")
    return value


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum("to", None, ["dice", "hf"], "output format (default: hf for a "
                      "dice-jax source, else dice)", flag_values=fv)
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "parameter dtype of the "
                      "output (default: float32 for imports, the checkpoint's own for "
                      "dice-jax sources)", flag_values=fv)
    flags.DEFINE_string("max_shard_size", "5GB", "largest safetensors shard of an HF "
                        "export", flag_values=fv)


def convert(source: str, destination: str, to: str | None = None, dtype: str | None = None,
            max_shard_bytes: int = 5 * 2**30) -> str:
    """Library form of the CLI; returns the output format written ("dice" or "hf")."""
    from dice_jax.checkpoints import load_model, resolve_source
    from dice_jax.checkpoints.hf import export_hf_folder
    from dice_jax.checkpoints.orbax_io import save_checkpoint
    from dice_jax.errors import CheckpointError

    if os.path.lexists(destination):
        raise CheckpointError(destination, "destination already exists; refusing to overwrite")
    kind, _ = resolve_source(source)
    to = to or ("hf" if kind == "dice" else "dice")
    overrides = {"param_dtype": dtype} if dtype else {}
    if kind != "dice" and not dtype:
        overrides = {"param_dtype": "float32"}
    loaded = load_model(source, **overrides)
    if to == "hf":
        export_hf_folder(loaded.params, loaded.config, destination, loaded.tokenizer,
                         max_shard_bytes=max_shard_bytes)
    else:
        save_checkpoint(loaded.params, loaded.config, destination, loaded.tokenizer)
    return to


def _run(fv: flags.FlagValues, positional: list[str]) -> int:
    if len(positional) != 2:
        raise ConfigError(f"expected SRC and DST, got {len(positional)} argument(s) "
                          f"{positional}; see --help")
    source, destination = positional
    shard = parse_size(fv.max_shard_size)
    start = time.time()
    to = convert(source, destination, fv.to, fv.dtype, shard)
    print(f"wrote {'HF folder' if to == 'hf' else 'dice-jax checkpoint'} {destination} "
          f"in {time.time() - start:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv, "python -m dice_jax.convert", __doc__, _define)


if __name__ == "__main__":
    sys.exit(main())
