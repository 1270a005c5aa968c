# Shared by the sbatch scripts in this directory (sourced, not run): set-up, the signal path,
# and the requeue decision. See docs/SLURM.md.
#
# Signal path. `#SBATCH --signal=B:USR1@120` sends the save-and-requeue warning to this batch
# shell, which remembers it and forwards it with `scancel --signal=USR1`, which reaches every
# process of the job's steps: the training processes (their handler finishes the step, saves a
# checkpoint, writes summary.json and exits 75) and, in the torchrun variant, each node's
# torchrun agent, which is told to handle SIGUSR1 by passing it on and waiting for its workers
# instead of dying of it. Remembering it matters when it lands while the trainers are still
# starting (no handler yet, so they die of it): the job is requeued all the same and resumes
# from its last checkpoint. A SIGTERM (scancel, the time limit, preemption) does not end this
# shell before the step has saved. Afterwards summary.json, the remembered request and the
# job's preemption state, not an exit status, decide whether to requeue
# (launch/slurm/job_state.py should-requeue).

pmss_die() { echo "pmss_dist: $*" >&2; exit 2; }

pmss_forward_stop() {
    STOP_REQUESTED=1
    echo "pmss_dist: batch shell got SIGUSR1 at $(date -Is): forwarding it to the training step"
    scancel --signal=USR1 "$SLURM_JOB_ID"
}

# Usage: pmss_setup "$@"   (the arguments of launch/train.py: --config FILE key=value ...)
pmss_setup() {
    STOP_REQUESTED=0
    trap pmss_forward_stop USR1
    trap 'echo "pmss_dist: batch shell got SIGTERM at $(date -Is): waiting for the training step to save"' TERM
    ATTEMPT_START=$(date +%s)
    cd "${PMSS_DIST_ROOT:-$SLURM_SUBMIT_DIR}" || pmss_die "cannot cd to ${PMSS_DIST_ROOT:-$SLURM_SUBMIT_DIR}"
    [ -f launch/train.py ] || pmss_die "$(pwd) is not the pmss_dist checkout: submit from the repository root or set PMSS_DIST_ROOT"
    PYTHON=${PYTHON:-python}
    # Resolving the config here fails a bad key before any node starts training.
    OUTPUT_DIR=$("$PYTHON" launch/slurm/job_state.py output-dir "$@") || pmss_die "invalid training arguments: $*"
    # The first node of the allocation hosts the rendezvous (c10d store or MASTER_ADDR).
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    # Derived from the job id so that two jobs sharing a node do not collide, and below Linux's
    # ephemeral range (32768+) where outgoing connections could hold it; export it to override.
    MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 10000))}
    export MASTER_ADDR MASTER_PORT
    # srun (SLURM >= 22.05) no longer inherits --cpus-per-task from the allocation.
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
    echo "pmss_dist: job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST" \
         "($SLURM_NNODES nodes), rendezvous $MASTER_ADDR:$MASTER_PORT, output $OUTPUT_DIR, started $(date -Is)"
}

# Usage: pmss_run_step srun [srun options] command...   Sets STEP_STATUS.
pmss_run_step() {
    "$@" &
    local pid=$!
    # `wait` returns early when a trapped signal arrives; keep waiting until the step is gone.
    while true; do
        wait "$pid"
        STEP_STATUS=$?
        kill -0 "$pid" 2>/dev/null || break
    done
}

# Requeue after a save-and-requeue request or a preemption, else end with the step's status.
pmss_finish() {
    local flags=()
    if [ "$STOP_REQUESTED" = 1 ]; then flags+=(--stop-requested); fi
    # SLURM sets PreemptTime when it picks the job for preemption (GraceTime then runs).
    if scontrol show job "$SLURM_JOB_ID" | grep -q 'PreemptTime=[0-9]'; then flags+=(--preempted); fi
    if "$PYTHON" launch/slurm/job_state.py should-requeue "$OUTPUT_DIR" --since "$ATTEMPT_START" "${flags[@]}"; then
        echo "pmss_dist: requeueing job $SLURM_JOB_ID; the next attempt resumes from $OUTPUT_DIR/checkpoints"
        scontrol requeue "$SLURM_JOB_ID" || pmss_die "scontrol requeue $SLURM_JOB_ID failed (was the job submitted with --requeue?)"
        exit 0
    fi
    echo "pmss_dist: step exited with status $STEP_STATUS at $(date -Is)"
    exit "$STEP_STATUS"
}
