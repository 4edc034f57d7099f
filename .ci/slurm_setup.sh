#!/usr/bin/env bash
# A throw-away one-node Slurm cluster on 127.0.0.1, for trying the slurm/ scripts on one machine and for
# tests/test_slurm.py. Needs root (munged and slurmd run as root here) and Debian's slurm-wlm + munge.
#
#   .ci/slurm_setup.sh install          apt-get install slurm-wlm munge, when sbatch/slurmctld/munged are missing
#   .ci/slurm_setup.sh up DIR           config, key, state and logs under DIR; starts munged, slurmctld, slurmd
#   export SLURM_CONF=DIR/etc/slurm.conf   then sbatch, squeue, scontrol ... talk to this cluster only
#   .ci/slurm_setup.sh down DIR         cancels its jobs and stops the three daemons (by their pid files)
#
# Nothing outside DIR is written: the system's /etc/slurm and /etc/munge stay untouched, so a real cluster on
# the same machine is not disturbed. Ports: SLURMCTLD_PORT / SLURMD_PORT, or free ones picked at random.
# The node has partitions "cpu" and "gpu" (the names the slurm/ templates use) but no GPUs.
set -euo pipefail

die() { echo "slurm_setup: $*" >&2; exit 1; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

install_packages() {
    if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
            && command -v munged >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "installing slurm-wlm and munge needs root"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
    local dir=$1 node=$2 cpus=$3 ctld_port=$4 slurmd_port=$5
    # The Debian packages' defaults assume systemd and cgroups; these choices work in a plain container:
    # linuxproc tracks job processes by parent pid, task/none binds nothing, and cgroup.conf must still exist
    # with a real plugin (CgroupPlugin=disabled keeps slurmd from starting).
    cat >"$dir/etc/slurm.conf" <<EOF
ClusterName=clipline-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
ReturnToService=2
KillWait=10
InactiveLimit=0
MinJobAge=600
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=cpu Nodes=$node Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$node MaxTime=INFINITE State=UP
EOF
    cat >"$dir/etc/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
IgnoreSystemd=yes
EOF
}

start_munged() {
    local dir=$1
    # MUNGE refuses keys and sockets in group- or world-writable places.
    head -c 1024 /dev/urandom >"$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
}

wait_until_idle() {
    local node=$1
    for _ in $(seq 1 60); do
        state=$(sinfo -h -n "$node" -o %T 2>/dev/null | head -n1 || true)
        case "$state" in
            idle|mixed|allocated) return 0 ;;
        esac
        sleep 0.5
    done
    die "node $node never became idle (state: '${state:-none}'); see $SLURM_CONF's logs: $(dirname "$(dirname "$SLURM_CONF")")/log/"
}

up() {
    local dir
    dir=$(realpath -m "$1")
    [ "$(id -u)" = 0 ] || die "this one-node cluster runs its daemons as root; run it as root"
    command -v slurmctld >/dev/null || die "slurm-wlm is not installed: run '$0 install' first"
    [ ! -e "$dir/run/slurmctld.pid" ] || die "$dir already holds a cluster; run '$0 down $dir' first"
    mkdir -p "$dir"/{etc,state,spool,run,log}
    mkdir -p -m 700 "$dir/munge"
    local node
    node=$(hostname -s)
    write_config "$dir" "$node" "$(nproc)" "${SLURMCTLD_PORT:-$(free_port)}" "${SLURMD_PORT:-$(free_port)}"
    export SLURM_CONF=$dir/etc/slurm.conf
    start_munged "$dir"
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF" -N "$node"
    wait_until_idle "$node"
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pid_file() {
    local pid_file=$1 pid
    [ -s "$pid_file" ] || return 0
    pid=$(cat "$pid_file")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

down() {
    local dir
    dir=$(realpath -m "$1")
    export SLURM_CONF=$dir/etc/slurm.conf
    if [ -s "$dir/run/slurmctld.pid" ] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null; then
        # Jobs first, so that no slurmstepd outlives the cluster.
        scancel --quiet --full $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
        for _ in $(seq 1 40); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.25
        done
    fi
    stop_pid_file "$dir/run/slurmd.pid"
    stop_pid_file "$dir/run/slurmctld.pid"
    stop_pid_file "$dir/run/munged.pid"
    rm -f "$dir"/run/*.pid
}

case "${1:-}" in
    install) install_packages ;;
    up) [ $# = 2 ] || die "usage: $0 up DIR"; up "$2" ;;
    down) [ $# = 2 ] || die "usage: $0 down DIR"; down "$2" ;;
    *) die "usage: $0 install | up DIR | down DIR" ;;
esac
