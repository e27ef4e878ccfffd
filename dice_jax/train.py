"""`python -m dice_jax.train --config=configs/NAME.py [--config.KEY=VALUE ...]`: a DICE run.

Runs Algorithm 1 (and the paper's baselines, `--config.method=...`) for `config.rounds`
rounds into `config.run_dir`. Running the same command again resumes at the first
incomplete stage; completed stages are never recomputed. Exit codes: 0 done, 2 bad config
or bad input (one message naming the key or file), 143 stopped by SIGTERM (training
checkpoints the step in progress first; the same command resumes).

Several processes (hosts) run the same command: with `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (optional `JAX_LOCAL_DEVICE_IDS`) set, or under a
cluster JAX detects itself (SLURM, Open MPI, TPU pod slices); see `dice_jax.distributed`.
"""

import json
import logging
import os
import sys

from absl import flags

from dice_jax.cli import config_of, run_main
from dice_jax.errors import ConfigError

PROG = "python -m dice_jax.train"


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool("print_config", False, "print the validated config as JSON and exit",
                      flag_values=fv)
    flags.DEFINE_bool("quiet", False, "no progress bars", flag_values=fv)


def _run(fv: flags.FlagValues, positional: list[str]) -> int:
    if positional:
        raise ConfigError(f"unknown argument(s) {positional}; see --help")
    if fv.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # every progress bar (tqdm reads it)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    from dice_jax.distributed import initialize_from_environment, quiet_other_processes

    initialize_from_environment()  # before any device is touched; bad launch: exit 2
    quiet_other_processes()
    import jax

    from dice_jax.config import validate

    config = validate(config_of(fv), jax.device_count())
    if fv.print_config:
        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return 0
    from dice_jax import preemption
    from dice_jax.run.loop import DiceRun

    preemption.install()  # SIGTERM: checkpoint the step in progress, exit 143
    run_dir = DiceRun(config, progress=not fv.quiet).run()
    print(f"done: {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from dice_jax import liveness

    code = run_main(_run, argv, PROG, __doc__, _define, run_config=True)
    liveness.mark_done()  # an end on purpose (an exception skips this: peers see it lost)
    return code


if __name__ == "__main__":
    sys.exit(main())
