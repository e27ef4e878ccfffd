"""`python -m dice_jax.train --config=configs/NAME.py [--config.KEY=VALUE ...]`: a DICE run.

Runs Algorithm 1 (and the paper's baselines, `--config.method=...`) for `config.rounds`
rounds into `config.run_dir`. Running the same command again resumes at the first
incomplete stage; completed stages are never recomputed. Exit codes: 0 done, 2 bad config
or bad input (one message naming the key or file).

Options:
  --config=FILE[:ARG]     a config file defining get_config() (configs/*.py)
  --config.KEY=VALUE      override any key (e.g. --config.dice.gamma=0.25 --config.rounds=3)
  --print-config          print the validated config and the memory plan, then exit
  --quiet                 no progress bars
"""

from __future__ import annotations

import logging
import os
import sys

from dice_jax.errors import DiceError
from dice_jax.run.config import ConfigError, build_config, parse_config_args


def _maybe_initialize_distributed() -> None:
    """Joins a multi-host job (TPU pod slice, or JAX_COORDINATOR_ADDRESS set) first."""
    import jax

    if os.environ.get("JAX_COORDINATOR_ADDRESS") or "," in os.environ.get(
            "TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    flags = {a for a in argv if a in ("--print-config", "--quiet")}
    argv = [a for a in argv if a not in flags]
    if "--quiet" in flags:
        os.environ["TQDM_DISABLE"] = "1"  # every progress bar (tqdm reads it)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    import jax

    _maybe_initialize_distributed()
    try:
        spec, overrides, rest = parse_config_args(argv)
        if rest:
            raise ConfigError(f"unknown argument(s) {rest}; see --help")
        config = build_config(spec, overrides, jax.device_count())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "--print-config" in flags:
        print(config)
        return 0
    from dice_jax.run.loop import DiceRun

    try:
        run_dir = DiceRun(config, progress="--quiet" not in flags).run()
    except DiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
