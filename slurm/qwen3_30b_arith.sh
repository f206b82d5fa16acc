#!/usr/bin/env bash
# qwen3-30b-arith: examples/configs/qwen3_30b_arith.yaml on 4 nodes x 8 H100 (its parallel layout: 32 ranks).
# Submit from the checkout, with torchrun on PATH (the activated .venv) or CONTAINER_IMAGE set:
#   sbatch slurm/qwen3_30b_arith.sh [KEY=VALUE ...]       # dotted overrides for megarl train
#   CONTAINER_IMAGE=IMAGE MOUNTS=/lustre:/lustre sbatch slurm/qwen3_30b_arith.sh   # pyxis
# Other node counts: sbatch --nodes=N ... parallel.world_size=$((8*N)). Knobs: slurm/lib/launch.sh.
#SBATCH --job-name=qwen3-30b-arith
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
# first thing: a signal during set-up is remembered, not fatal (slurm/lib/launch.sh acts on it)
trap 'MEGARL_SIGNALLED=USR1' USR1
trap 'MEGARL_SIGNALLED=TERM' TERM
set -euo pipefail

# sbatch runs a copy of this script from its spool folder: find the library through the checkout
MEGARL_ROOT=${MEGARL_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/lib/launch.sh
source "$MEGARL_ROOT/slurm/lib/launch.sh"
megarl_launch examples/configs/qwen3_30b_arith.yaml "$@"
