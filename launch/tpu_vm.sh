#!/usr/bin/env bash
# Run a DICE config on a (multi-host) Cloud TPU VM slice: the same command on every worker.
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/llama3.py [--config.KEY=VALUE ...]
#
# Needs the repository at ~/dice-jax on every worker, installed as the README says with
# `pip install -e . "jax[tpu]"`. dice_jax.train joins the hosts of a multi-host TPU slice
# into one job (JAX detects the slice), so all hosts form one mesh. config.run_dir must be
# a folder every host sees (e.g. a mounted bucket): process 0 writes it, and the run stops
# at start-up if another host cannot read back process 0's token file.
set -euo pipefail
tpu="${1:?usage: launch/tpu_vm.sh TPU_NAME ZONE CONFIG.py [overrides...]}"
zone="${2:?zone}"
config="${3:?config}"
shift 3
printf -v args ' %q' "$@"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/dice-jax && python -m dice_jax.train --config=$config$args"
