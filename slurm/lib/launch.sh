# shellcheck shell=bash
# megarl's Slurm launcher, sourced by the sbatch scripts in slurm/ (one line each: the recipe).
# docs/slurm.md has the whole story; tests/slurm/ runs it on a real (one-host) Slurm cluster.
#
# One `srun` step starts one `torchrun` per node; torchrun starts RANKS_PER_NODE ranks and they
# meet at a c10d rendezvous on the job's first node, so every node runs the same command line.
# No Ray: every process is a torch.distributed rank (vLLM runs inside them, colocated).
#
# Stopping without losing work: the time-limit signal (sbatch --signal=B:USR1@SECONDS) reaches
# this shell, which passes USR1 to the ranks; they finish the step, write a checkpoint, report
# it in a status file and exit, and the job is requeued, to resume from that step. A job that
# finished no step in an attempt is not requeued (a time limit too short to train). SIGTERM
# (preemption, scancel) reaches the ranks from Slurm itself: they checkpoint at the end of the
# step too, and Slurm requeues a preempted job if the cluster says so.
#
# Knobs (environment, all optional):
#   CONTAINER_IMAGE, MOUNTS  run inside a pyxis/enroot container (srun --container-image,
#                            --container-mounts); without CONTAINER_IMAGE, on the host
#   MEGARL_ROOT              the checkout (default: the submit directory); the ranks run there
#   TORCHRUN                 torchrun to start (default: torchrun on PATH, e.g. the activated
#                            .venv: sbatch passes the submitting shell's environment)
#   RANKS_PER_NODE           ranks per node (default: the GPUs Slurm gives the node; without
#                            GPUs, the job's --ntasks-per-node, else 1). GPUS_PER_NODE: the same
#   MASTER_PORT              rendezvous port (default: a free port on the first node, from the
#                            job id, so jobs sharing a node do not collide)
#   RUN_NAME                 logging.run_name (default JOBNAME-JOBID-SUBMITTED, recorded in the
#                            job's comment: one name for all requeues of a job, a new one for
#                            every job, even after job ids restart)
#   LOG_ROOT                 per-run logs go to LOG_ROOT/RUN_NAME/ (default MEGARL_ROOT/logs)
#   MAX_REQUEUES             requeue a job at most this many times (default 50)
# Arguments after the script name on the sbatch command line are dotted overrides
# (KEY=VALUE) for `megarl train`; they win over the recipe and over the defaults set here.

# Signals that arrive before the launcher's own handlers exist are remembered (the job scripts
# install this first thing; sourcing this file does it again).
megarl_remember_signals() {
    trap 'MEGARL_SIGNALLED=USR1' USR1
    trap 'MEGARL_SIGNALLED=TERM' TERM
}
megarl_remember_signals

# Exported defaults for NCCL, vLLM and the PyTorch allocator; a value already set wins.
megarl_environment() {
    local ranks=$1
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
    # the CPUs Slurm gives the node, shared by its ranks
    local cpus=${SLURM_CPUS_ON_NODE:-1}
    : "${OMP_NUM_THREADS:=$(( cpus / ranks > 0 ? cpus / ranks : 1 ))}"
    export PYTORCH_CUDA_ALLOC_CONF CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING \
        NCCL_DEBUG NCCL_IB_TIMEOUT TOKENIZERS_PARALLELISM OMP_NUM_THREADS
}

# The first node of the allocation (it hosts the rendezvous) and its address: the NodeAddr
# Slurm reaches it at, which resolves where a NodeName need not.
megarl_head_node() {
    scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
}

megarl_node_addr() {
    local addr
    addr=$(scontrol show node "$1" -o 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
    echo "${addr:-$1}"
}

# A free port on this host (the batch shell runs on the first node), starting from one derived
# from the job id: jobs sharing a node get different ones.
megarl_free_port() {
    local port=$(( 20000 + (${SLURM_JOB_ID:-0} * 7) % 20000 )) tries
    for tries in $(seq 100); do
        if ! (: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
        port=$(( port + 1 + tries % 2 ))
    done
    echo "megarl: no free rendezvous port near $port: set MASTER_PORT" >&2
    return 1
}

# Ranks per node: RANKS_PER_NODE (or GPUS_PER_NODE), else the node's GPUs, else the job's
# --ntasks-per-node, else 1. Echoes "RANKS GPUS".
megarl_ranks_per_node() {
    local gpus=${SLURM_GPUS_ON_NODE:-0}
    [[ $gpus =~ ^[0-9]+$ ]] || gpus=0
    local ranks=${RANKS_PER_NODE:-${GPUS_PER_NODE:-}}
    if [ -z "$ranks" ]; then
        if [ "$gpus" -gt 0 ]; then ranks=$gpus; else ranks=${SLURM_NTASKS_PER_NODE:-1}; fi
    fi
    echo "$ranks $gpus"
}

# The run's name: RUN_NAME, or the one an earlier attempt of this job recorded in the job's
# comment, or a new one (recorded there for the next attempts).
megarl_run_name() {
    if [ -n "${RUN_NAME:-}" ]; then echo "$RUN_NAME"; return 0; fi
    local job=$SLURM_JOB_ID name
    name=$(scontrol show job "$job" -o 2>/dev/null | tr ' ' '\n' |
        sed -n 's/^Comment=megarl-run://p')
    if [ -z "$name" ]; then
        name="${SLURM_JOB_NAME:-megarl}-$job-$(date -u +%Y%m%dT%H%M%S)"
        scontrol update "JobId=$job" "Comment=megarl-run:$name" >/dev/null 2>&1 ||
            echo "megarl: could not record the run name in job $job's comment: a requeue" \
                "starts a new run (set RUN_NAME to resume one)" >&2
    fi
    echo "$name"
}

# Build MEGARL_SRUN (srun and its options: one token each, --opt=value) and MEGARL_TORCHRUN
# (the command every node runs) for RECIPE and the overrides that follow it.
megarl_build_command() {
    local recipe=$1
    shift
    local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?not inside a Slurm job}}
    local job=${SLURM_JOB_ID:?not inside a Slurm job}
    local ranks gpus head addr port
    read -r ranks gpus < <(megarl_ranks_per_node)
    head=$(megarl_head_node)
    [ -n "$head" ] || { echo "megarl: no node in SLURM_JOB_NODELIST" >&2; return 1; }
    addr=$(megarl_node_addr "$head")
    port=${MASTER_PORT:-$(megarl_free_port)} || return 1

    MEGARL_SRUN=(srun "--nodes=$nodes" --ntasks-per-node=1 "--ntasks=$nodes")
    [ "$gpus" -eq 0 ] || MEGARL_SRUN+=("--gpus-per-node=$gpus")
    MEGARL_SRUN+=("--cpus-per-task=${SLURM_CPUS_ON_NODE:-1}"
        --kill-on-bad-exit=1 "--chdir=$MEGARL_ROOT"
        "--output=$MEGARL_LOG_DIR/attempt${SLURM_RESTART_COUNT:-0}-%N.log")
    if [ -n "${CONTAINER_IMAGE:-}" ]; then
        MEGARL_SRUN+=("--container-image=$CONTAINER_IMAGE" "--container-workdir=$MEGARL_ROOT")
        [ -z "${MOUNTS:-}" ] || MEGARL_SRUN+=("--container-mounts=$MOUNTS")
    fi
    # torchrun itself ignores USR1 (its default action would kill it): only the ranks act on it
    MEGARL_TORCHRUN=(bash -c 'trap "" USR1; exec "$@"' megarl-rank
        "${TORCHRUN:-torchrun}" "--nnodes=$nodes" "--nproc-per-node=$ranks"
        --rdzv-backend=c10d "--rdzv-endpoint=$addr:$port"
        "--rdzv-id=$job-${SLURM_RESTART_COUNT:-0}" --max-restarts=0
        -m megarl train "$recipe" "logging.run_name=$MEGARL_RUN_NAME" "$@")
    megarl_environment "$ranks"
}

# USR1 (time limit near): ask the ranks to checkpoint and stop; the job is requeued after.
megarl_on_usr1() {
    MEGARL_SIGNALLED=USR1
    echo "megarl: time limit near: the ranks finish their step, checkpoint and stop" >&2
    kill -USR1 "$MEGARL_STEP" 2>/dev/null || true  # srun passes it to the ranks
}

megarl_on_term() {
    MEGARL_SIGNALLED=TERM
    echo "megarl: SIGTERM (preemption or scancel): the ranks checkpoint at the end of" \
        "their step" >&2
}

# After a USR1 stop: requeue if this attempt trained (the status file the trainer wrote says
# which step it stopped at and which it started from), never endlessly.
megarl_requeue_after_stop() {
    local status_file=$1 start=-1 stopped=-1
    if grep -qs '"reason": "finished"' "$status_file"; then
        return 0  # the run ended before the signal reached it
    fi
    if [ -f "$status_file" ]; then
        start=$(sed -n 's/.*"start_step": *\([0-9]*\).*/\1/p' "$status_file")
        stopped=$(sed -n 's/.*"step": *\([0-9]*\).*/\1/p' "$status_file")
    fi
    if [ "${stopped:--1}" -le "${start:--1}" ]; then
        echo "megarl: job $SLURM_JOB_ID trained no step before the time-limit signal: not" \
            "requeueing (give --time more than the --signal offset plus start-up)" >&2
        return 1
    fi
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "${MAX_REQUEUES:-50}" ]; then
        echo "megarl: job $SLURM_JOB_ID stopped at step $stopped after" \
            "${SLURM_RESTART_COUNT:-0} requeues (MAX_REQUEUES): submit it again to go on" >&2
        return 0
    fi
    echo "megarl: stopped at step $stopped (checkpoint written); requeueing job" \
        "$SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID" ||
        echo "megarl: scontrol requeue failed (submitted with --no-requeue?): submit the" \
            "job again with RUN_NAME=$MEGARL_RUN_NAME to resume from step $stopped" >&2
    return 0
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
    : "${SLURM_JOB_ID:?not inside a Slurm job}"
    MEGARL_RUN_NAME=$(megarl_run_name)
    MEGARL_LOG_DIR=${LOG_ROOT:-$MEGARL_ROOT/logs}/$MEGARL_RUN_NAME
    mkdir -p "$MEGARL_LOG_DIR"
    local attempt=${SLURM_RESTART_COUNT:-0}
    export MEGARL_STOP_STATUS=$MEGARL_LOG_DIR/stop-attempt$attempt.json
    rm -f "$MEGARL_STOP_STATUS"
    megarl_build_command "$recipe" "$@" || return 1
    printf '%q ' "${MEGARL_SRUN[@]}" "${MEGARL_TORCHRUN[@]}" >>"$MEGARL_LOG_DIR/commands.sh"
    echo >>"$MEGARL_LOG_DIR/commands.sh"
    echo "megarl: job $SLURM_JOB_ID attempt $attempt, run $MEGARL_RUN_NAME: logs in" \
        "$MEGARL_LOG_DIR" >&2
    if [ "${MEGARL_SIGNALLED:-}" = USR1 ]; then  # the limit came before anything started
        megarl_requeue_after_stop "$MEGARL_STOP_STATUS"
        return 1
    fi

    "${MEGARL_SRUN[@]}" "${MEGARL_TORCHRUN[@]}" &
    MEGARL_STEP=$!
    trap megarl_on_usr1 USR1
    trap megarl_on_term TERM
    [ "${MEGARL_SIGNALLED:-}" != TERM ] || kill -TERM "$MEGARL_STEP" 2>/dev/null || true
    local status=0
    # wait returns early (> 128) when a signal arrives; wait again until srun itself ends
    while true; do
        wait "$MEGARL_STEP" && status=0 || status=$?
        kill -0 "$MEGARL_STEP" 2>/dev/null || break
    done
    if [ "${MEGARL_SIGNALLED:-}" = USR1 ]; then
        megarl_requeue_after_stop "$MEGARL_STOP_STATUS"
        return $?
    fi
    return "$status"
}
