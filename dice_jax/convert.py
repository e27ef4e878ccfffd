"""Convert checkpoints: HF folder / hub id / GGUF -> dice-jax (orbax), and dice-jax -> HF.

    python -m dice_jax.convert SRC DST [--to dice|hf] [--dtype float32|bfloat16]

SRC is an HF folder, a hub id (`org/name`, network needed), a `.gguf` file, a dice-jax
checkpoint folder, or `embedded:smollm2`. By default a dice-jax checkpoint becomes an HF
folder and anything else becomes a dice-jax checkpoint. DST must not exist; it is written
under a temporary name and renamed, so a failed run leaves nothing behind. Errors print
one line naming the file at fault and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from dice_jax.errors import DiceError

_SIZE_UNITS = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}


def parse_size(text: str) -> int:
    """'5GB' -> 5368709120; plain integers are bytes."""
    t = text.strip().upper()
    unit = next((u for u in _SIZE_UNITS if t.endswith(u)), "")
    number, factor = t[: len(t) - len(unit)].strip(), _SIZE_UNITS.get(unit, 1)
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; e.g. 5GB, 500MB") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dice_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="HF folder, hub id, .gguf file, dice-jax checkpoint, "
                   "or embedded:smollm2")
    p.add_argument("destination", help="output folder (must not exist)")
    p.add_argument("--to", choices=("dice", "hf"), default=None,
                   help="output format (default: hf for a dice-jax source, else dice)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="parameter dtype of the output (default: float32 for imports, the "
                   "checkpoint's own for dice-jax sources)")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"),
                   help="largest safetensors shard of an HF export (default 5GB)")
    return p


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        to = convert(args.source, args.destination, args.to, args.dtype, args.max_shard_size)
    except DiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {'HF folder' if to == 'hf' else 'dice-jax checkpoint'} {args.destination} "
          f"in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
