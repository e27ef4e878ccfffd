#!/usr/bin/env bash
# Run a DICE config on several GPU nodes under SLURM: one process per node, every GPU of
# every node in one mesh.
#
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/slurm.sh \
#       configs/llama3.py --config.run_dir=/shared/runs/llama3 [--config.KEY=VALUE ...]
#
# srun starts the same command on every node; JAX detects the SLURM job and joins its
# processes into one job (coordinator: the first node), so no variable needs setting.
# config.run_dir must be a folder all nodes share (NFS, Lustre): process 0 writes it, and
# the run stops at start-up if another node cannot read back process 0's token file.
# Resubmitting the same command resumes the run.
#SBATCH --job-name=dice-jax
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
set -euo pipefail
config="${1:?usage: sbatch launch/slurm.sh CONFIG.py [--config.KEY=VALUE ...]}"
shift
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
exec srun --kill-on-bad-exit=1 python -m dice_jax.train --config="$config" "$@"
