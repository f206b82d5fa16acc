# shellcheck shell=bash
# megarl's Slurm launcher, sourced by the sbatch scripts in slurm/ (one line each: the recipe).
#
# One `srun` step starts one `torchrun` per node; torchrun starts GPUS_PER_NODE ranks and they
# meet at a c10d rendezvous on the job's first node, so every node runs the same command line.
# No Ray: every process is a torch.distributed rank (vLLM runs inside them, colocated).
#
# Knobs (environment, all optional):
#   CONTAINER_IMAGE, MOUNTS  run inside a pyxis/enroot container (srun --container-image,
#                            --container-mounts); without CONTAINER_IMAGE, on the host
#   MEGARL_ROOT              the checkout (default: the submit directory); the ranks run there
#   TORCHRUN                 torchrun to start (default: torchrun on PATH, e.g. the activated
#                            .venv: sbatch passes the submitting shell's environment)
#   GPUS_PER_NODE            ranks per node (default: Slurm's GPU count on the node, else 8)
#   MASTER_PORT              rendezvous port on the first node (default 29500)
#   RUN_NAME                 logging.run_name (default JOBNAME-JOBID: stable across requeues,
#                            so a requeued job resumes from its newest checkpoint)
#   LOG_ROOT                 per-job logs go to LOG_ROOT/JOBNAME-JOBID/ (default MEGARL_ROOT/logs)
# Arguments after the script name on the sbatch command line are dotted overrides
# (KEY=VALUE) for `megarl train`; they win over the recipe and over the defaults set here.

# Exported defaults for NCCL, vLLM and the PyTorch allocator; a value already set wins.
megarl_environment() {
    # vLLM's external launcher runs the engine inside this rank, not in a subprocess
    export VLLM_ENABLE_V1_MULTIPROCESSING=0
    # vLLM sleep mode allocates through a CUDA memory pool, which expandable segments break
    : "${PYTORCH_CUDA_ALLOC_CONF:=expandable_segments:False}"
    # Megatron orders TP / SP communication behind compute on one hardware queue
    : "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"
    : "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"  # a hung collective fails the job, not the clock
    : "${NCCL_DEBUG:=WARN}"
    : "${NCCL_IB_TIMEOUT:=22}"
    : "${TOKENIZERS_PARALLELISM:=false}"
    : "${OMP_NUM_THREADS:=8}"
    export PYTORCH_CUDA_ALLOC_CONF CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING \
        NCCL_DEBUG NCCL_IB_TIMEOUT TOKENIZERS_PARALLELISM OMP_NUM_THREADS
}

# The first node of the allocation: it hosts the rendezvous.
megarl_head_node() {
    scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
}

# Build MEGARL_SRUN (srun and its options: one token each, --opt=value) and MEGARL_TORCHRUN
# (the command every node runs) for RECIPE and the overrides that follow it.
megarl_build_command() {
    local recipe=$1
    shift
    local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?not inside a Slurm job}}
    local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    local job=${SLURM_JOB_ID:?not inside a Slurm job}
    local name=${SLURM_JOB_NAME:-megarl}
    local head
    head=$(megarl_head_node)
    [ -n "$head" ] || { echo "megarl: no node in SLURM_JOB_NODELIST" >&2; return 1; }

    MEGARL_SRUN=(srun "--nodes=$nodes" --ntasks-per-node=1 "--ntasks=$nodes"
        "--gpus-per-node=$gpus" "--cpus-per-task=${SLURM_CPUS_ON_NODE:-64}"
        --kill-on-bad-exit=1 "--chdir=$MEGARL_ROOT"
        "--output=$MEGARL_LOG_DIR/attempt${SLURM_RESTART_COUNT:-0}-%N.log")
    if [ -n "${CONTAINER_IMAGE:-}" ]; then
        MEGARL_SRUN+=("--container-image=$CONTAINER_IMAGE" "--container-workdir=$MEGARL_ROOT")
        [ -z "${MOUNTS:-}" ] || MEGARL_SRUN+=("--container-mounts=$MOUNTS")
    fi
    MEGARL_TORCHRUN=("${TORCHRUN:-torchrun}" "--nnodes=$nodes" "--nproc-per-node=$gpus"
        --rdzv-backend=c10d "--rdzv-endpoint=$head:${MASTER_PORT:-29500}"
        "--rdzv-id=$job-${SLURM_RESTART_COUNT:-0}" --max-restarts=0
        -m megarl train "$recipe" "logging.run_name=${RUN_NAME:-$name-$job}" "$@")
}

# Time limit near (sbatch --signal=B:USR1@...): put the job back in the queue; it resumes from
# its newest checkpoint under the same run name.
megarl_requeue() {
    echo "megarl: time limit near, requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
}

# Launch RECIPE (a path relative to the checkout) with the overrides that follow it.
megarl_launch() {
    local recipe=$1
    shift
    MEGARL_ROOT=${MEGARL_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
    [ -f "$MEGARL_ROOT/$recipe" ] || {
        echo "megarl: recipe $recipe not found under $MEGARL_ROOT (submit from the checkout" \
            "or set MEGARL_ROOT)" >&2
        return 1
    }
    MEGARL_LOG_DIR=${LOG_ROOT:-$MEGARL_ROOT/logs}/${SLURM_JOB_NAME:-megarl}-${SLURM_JOB_ID:?}
    mkdir -p "$MEGARL_LOG_DIR"
    megarl_environment
    megarl_build_command "$recipe" "$@" || return 1
    printf '%q ' "${MEGARL_SRUN[@]}" "${MEGARL_TORCHRUN[@]}" >>"$MEGARL_LOG_DIR/commands.sh"
    echo >>"$MEGARL_LOG_DIR/commands.sh"
    echo "megarl: job $SLURM_JOB_ID attempt ${SLURM_RESTART_COUNT:-0}: logs in $MEGARL_LOG_DIR" >&2

    trap megarl_requeue USR1
    "${MEGARL_SRUN[@]}" "${MEGARL_TORCHRUN[@]}" &
    local step=$! status=0
    # wait returns early (> 128) when a signal arrives; wait again until srun itself ends
    while true; do
        wait "$step" && status=0 || status=$?
        kill -0 "$step" 2>/dev/null || break
    done
    return "$status"
}
