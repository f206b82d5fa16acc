#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for megarl's launcher tests (tests/slurm/).
#
#   bash scripts/slurm-cluster.sh start    # install (apt) if needed, configure, start, wait idle
#   bash scripts/slurm-cluster.sh env      # the line to eval: export SLURM_CONF=...
#   bash scripts/slurm-cluster.sh status
#   bash scripts/slurm-cluster.sh stop     # stop exactly the daemons start started
#
# Debian's slurm-wlm (22.05) and munge, run as root. Everything lives in one state folder
# (MEGARL_SLURM_DIR, default /tmp/megarl-slurm): slurm.conf, gres.conf, the fake GPUs, spool,
# controller state, logs and the daemons' PIDs. Nothing under /etc is written; the packages'
# own services are not used. GPUs are faked as character devices (gres.conf File=), so the real
# job scripts' --gpus-per-node=8 is accepted and srun sets CUDA_VISIBLE_DEVICES; the node
# declares 8 CPUs and 8 GPUs whatever the machine has (SlurmdParameters=config_overrides).
set -euo pipefail

DIR=${MEGARL_SLURM_DIR:-/tmp/megarl-slurm}
# NODES nodes named megarl-n1.., each a slurmd (~6 MB) at 127.0.0.1 on its own port, so the real
# job scripts (up to 8 nodes) pass sbatch --test-only and multi-node jobs run on one host. A
# node's address is its NodeAddr: no name needs to resolve, nothing goes into /etc/hosts.
NODES=${MEGARL_SLURM_NODES:-8}
START_NODES=$NODES
CPUS=${MEGARL_SLURM_CPUS:-8}
GPUS=${MEGARL_SLURM_GPUS:-8}
CTLD_PORT=${MEGARL_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${MEGARL_SLURMD_PORT:-6818}
MUNGE_SOCKET=$DIR/munge/munge.socket.2

die() { echo "slurm-cluster: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (the daemons and the fake GPU devices need it)"; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v sbatch >/dev/null && command -v munged >/dev/null && return 0
    echo "slurm-cluster: installing slurmctld slurmd slurm-client munge (apt)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # the packages' own service start is blocked in containers: start the daemons ourselves
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
    local mem
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$DIR"/{spool,state,log,dev,munge}
    for i in $(seq 0 $((GPUS - 1))); do
        [ -c "$DIR/dev/gpu$i" ] || mknod "$DIR/dev/gpu$i" c 1 3  # /dev/null's numbers
    done
    cat >"$DIR/slurm.conf" <<EOF
ClusterName=megarl-test
SlurmctldHost=$(hostname -s)(127.0.0.1)
MailProg=/bin/true
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MinJobAge=3600
ReturnToService=2
SchedulerParameters=sched_interval=5,bf_interval=5
KillWait=30
EOF
    for n in $(seq "$NODES"); do
        echo "NodeName=megarl-n$n NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + n - 1)) CPUs=$CPUS" \
            "RealMemory=$mem Gres=gpu:$GPUS State=UNKNOWN" >>"$DIR/slurm.conf"
    done
    echo "PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$DIR/slurm.conf"
    : >"$DIR/gres.conf"
    echo "AutoDetect=off" >>"$DIR/gres.conf"
    for i in $(seq 0 $((GPUS - 1))); do
        echo "NodeName=megarl-n[1-$NODES] Name=gpu File=$DIR/dev/gpu$i" >>"$DIR/gres.conf"
    done
}

running() { [ -f "$DIR/$1.pid.ours" ] && kill -0 "$(cat "$DIR/$1.pid.ours")" 2>/dev/null; }

start() {
    need_root
    if running slurmctld && running munged; then
        echo "slurm-cluster: already running ($DIR)" >&2
        return 0
    fi
    install_packages
    write_config
    [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key missing (reinstall munge)"
    chown munge:munge "$DIR/munge"
    # munged runs as its own user, with its socket in the state folder
    setpriv --reuid=munge --regid=munge --init-groups munged -F --socket="$MUNGE_SOCKET" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" >>"$DIR/log/munged.out" 2>&1 &
    echo $! >"$DIR/munged.pid.ours"
    for _ in $(seq 50); do [ -S "$MUNGE_SOCKET" ] && break; sleep 0.1; done
    [ -S "$MUNGE_SOCKET" ] || die "munged did not start: $DIR/log/munged.log"
    export SLURM_CONF=$DIR/slurm.conf
    slurmctld -D -f "$SLURM_CONF" >>"$DIR/log/slurmctld.out" 2>&1 &
    echo $! >"$DIR/slurmctld.pid.ours"
    local up="megarl-n[1-$START_NODES]" n state=
    for n in $(seq "$START_NODES"); do
        mkdir -p "$DIR/spool/megarl-n$n"
        slurmd -D -N "megarl-n$n" -f "$SLURM_CONF" >>"$DIR/log/slurmd-megarl-n$n.out" 2>&1 &
        echo $! >"$DIR/slurmd-n$n.pid.ours"
    done
    for _ in $(seq 120); do
        state=$(sinfo -h -n "$up" -o %t 2>/dev/null | sort -u | tr '\n' ' ' || true)
        [ "$state" = "idle " ] && break
        sleep 0.5
    done
    [ "$state" = "idle " ] || die "nodes $up are '${state:-unreachable}', not idle: $DIR/log/"
    echo "slurm-cluster: up in $DIR: $up idle ($CPUS CPUs, $GPUS fake GPUs each)" >&2
}

stop() {
    local file pid
    for file in "$DIR"/slurmd-n*.pid.ours "$DIR/slurmctld.pid.ours" "$DIR/munged.pid.ours"; do
            [ -f "$file" ] || continue
            pid=$(cat "$file")
            if kill -0 "$pid" 2>/dev/null; then
                kill "$pid" 2>/dev/null || true
                for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
                kill -9 "$pid" 2>/dev/null || true
            fi
            rm -f "$file"
    done
    echo "slurm-cluster: stopped" >&2
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$DIR/slurm.conf" ;;
    status)
        SLURM_CONF=$DIR/slurm.conf sinfo -h -o '%n %t %c %G' 2>/dev/null || echo "not running" ;;
    *) die "usage: $0 start|stop|env|status" ;;
esac
