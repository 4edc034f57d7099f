# Sourced by the slurm/*.sbatch scripts (not submitted itself): where the checkout and its Python are, and how
# a training step turns a preemption warning into a checkpoint and a requeue.

# training.trainer.EXIT_PREEMPTED: the trainer wrote a checkpoint after a signal and did not finish.
EXIT_PREEMPTED=75

# Work from the checkout: configs and model JSON paths in them are relative to it. sbatch runs a copy of the
# script from its spool folder, so the checkout is CLIPLINE_DIR or the folder sbatch was called from.
clipline_setup() {
    CLIPLINE_DIR=${CLIPLINE_DIR:-$SLURM_SUBMIT_DIR}
    cd "$CLIPLINE_DIR"
    PYTHON=${PYTHON:-$CLIPLINE_DIR/.venv/bin/python}
    if [ ! -x "$PYTHON" ]; then
        echo "clipline: no Python at $PYTHON; run 'make setup' in $CLIPLINE_DIR or export PYTHON=/path/to/python" >&2
        exit 2
    fi
    export PYTHONUNBUFFERED=1  # log lines reach the job's output file as they happen
    echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST at $(date -Is): $PYTHON in $PWD"
}

# The address of the allocation's first node, where the rendezvous / TCP store runs: Slurm's own NodeAddr
# for it, which every node of the allocation can reach.
head_node_addr() {
    local head
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    scontrol show node "$head" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2
}

# A port for the rendezvous that two jobs sharing a node are unlikely to both pick.
job_port() {
    echo $((20000 + SLURM_JOB_ID % 20000))
}

_got_usr1=""
_got_term=""
_step_pid=""

_forward_usr1() {
    # To every task of every step on every node (not back to this shell): each trainer finishes its step, all
    # ranks agree, rank 0 writes a checkpoint and they exit with EXIT_PREEMPTED.
    scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$_step_pid" 2>/dev/null || true
}

_on_usr1() {
    echo "clipline: USR1 at $(date -Is): asking the trainers to checkpoint and stop"
    _got_usr1=1
    [ -z "$_step_pid" ] || _forward_usr1
}

_on_term() {
    # Slurm sends TERM to every process itself (scancel, preemption, the hard time limit): nothing to forward,
    # and no requeue from here: a cancelled job must stay cancelled, and Slurm requeues preempted jobs itself.
    echo "clipline: TERM at $(date -Is): the trainers checkpoint; this job will not requeue itself"
    _got_term=1
}

# run_requeueable CMD...: run the training step CMD (an srun), then requeue this job when it stopped early
# because of a warning signal; exit with CMD's status otherwise.
run_requeueable() {
    local rc
    trap _on_usr1 USR1
    trap _on_term TERM
    "$@" &
    _step_pid=$!
    [ -z "$_got_usr1" ] || _forward_usr1  # a signal that came before the step existed
    # A trapped signal interrupts `wait`; keep waiting until the step itself has ended.
    while :; do
        wait "$_step_pid" && rc=0 || rc=$?
        kill -0 "$_step_pid" 2>/dev/null || break
    done
    trap - USR1 TERM
    if [ "$rc" -ne 0 ] && [ -z "$_got_term" ] && { [ -n "$_got_usr1" ] || [ "$rc" -eq "$EXIT_PREEMPTED" ]; }; then
        requeue_self "step ended with status $rc after a stop signal" "$rc"
    fi
    return "$rc"
}

requeue_self() {
    local reason=$1 rc=$2 restarts=${SLURM_RESTART_COUNT:-0} max=${MAX_REQUEUES:-100}
    if [ "$restarts" -ge "$max" ]; then
        echo "clipline: $reason, but this job was already requeued $restarts times (MAX_REQUEUES=$max)" >&2
        exit "$rc"
    fi
    echo "clipline: $reason: requeueing job $SLURM_JOB_ID; the next run resumes from the newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID" || exit "$rc"
    # Slurm ends this script as part of the requeue. Never exit 0 here: an unfinished training must not
    # satisfy an afterok dependency.
    exit "$rc"
}
