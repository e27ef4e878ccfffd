#!/usr/bin/env bash
# Run a DICE config on one host: all its GPUs (or a single-host TPU VM, or the CPU).
#
#   launch/single_host.sh configs/zephyr.py [--config.KEY=VALUE ...]
#
# Every local device joins one mesh (config.mesh; default fsdp over all devices). The run
# folder is config.run_dir; running the same command again resumes it.
set -euo pipefail
config="${1:?usage: launch/single_host.sh CONFIG.py [--config.KEY=VALUE ...]}"
shift
cd "$(dirname "$0")/.."

if command -v nvidia-smi >/dev/null 2>&1; then
  # Let XLA take most of GPU memory up front (no fragmentation from the growth allocator),
  # and overlap collectives with compute.
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
  echo "devices: $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
fi
exec python -m dice_jax.train --config="$config" "$@"
