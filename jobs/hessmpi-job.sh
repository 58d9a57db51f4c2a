# What every hessmpi job template shares; sourced by jobs/*.sbatch, never run alone.
#
# - strict mode (set -euo pipefail): any failing command fails the job;
# - cd to the project ($HESSMPI_HOME, else the folder sbatch was called from) and
#   load the software environment from jobs/site-env.sh (the one place for module loads);
# - ranks from the allocation (SLURM_NTASKS) and TensorFlow threads per rank from
#   --cpus-per-task (HESSMPI_TF_THREADS);
# - results into $HESSMPI_RESULTS/<job name>-<job id>/ (arrays: <job name>-<array id>_<task>);
#   checkpoints into $HESSMPI_RESULTS/checkpoints/<job name>[_<task>].h5, a name that
#   survives resubmission, so the same job submitted again continues from it;
# - hessmpi_run SCRIPT ARGS...: launch SCRIPT on every rank with `srun --mpi=pmix`,
#   or with `mpirun` when HESSMPI_LAUNCHER=mpirun;
# - no work lost at the time limit: the templates ask Slurm for SIGUSR1 to this shell
#   before the limit (#SBATCH --signal=B:USR1@<seconds>); hessmpi_run passes it (and
#   SIGTERM) on to the ranks, which save their progress and exit with status 75; the job
#   then requeues itself (#SBATCH --requeue) and continues from its checkpoint when it
#   runs again, at most HESSMPI_MAX_RESTARTS (default 20) times.
#
# Environment read: HESSMPI_HOME (project folder), HESSMPI_RESULTS (default
# $HESSMPI_HOME/results), HESSMPI_LAUNCHER (srun | mpirun), HESSMPI_PYTHON (set by site-env.sh),
# HESSMPI_MAX_RESTARTS.
set -euo pipefail

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "hessmpi-job.sh: not inside a Slurm job; submit the template with sbatch" >&2
    exit 2
fi
HESSMPI_HOME=$(cd "${HESSMPI_HOME:-$SLURM_SUBMIT_DIR}" && pwd)
cd "$HESSMPI_HOME"
. jobs/site-env.sh

HESSMPI_NTASKS=${SLURM_NTASKS:-1}
export HESSMPI_TF_THREADS=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=$HESSMPI_TF_THREADS
# Slurm 22.05's srun does not inherit --cpus-per-task from the batch job; later ones do.
export SRUN_CPUS_PER_TASK=$HESSMPI_TF_THREADS
# More CPUs allocated than this node has cores (a node declared bigger than it is, as
# in tests): ranks waiting in a collective must yield the core, not spin on it.
if ((${SLURM_CPUS_ON_NODE:-0} > $(nproc))); then
    export OMPI_MCA_mpi_yield_when_idle=1
fi

HESSMPI_RESULTS=${HESSMPI_RESULTS:-$HESSMPI_HOME/results}
if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    HESSMPI_OUT_DIR=$HESSMPI_RESULTS/$SLURM_JOB_NAME-${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID
    HESSMPI_CHECKPOINT=$HESSMPI_RESULTS/checkpoints/${SLURM_JOB_NAME}_$SLURM_ARRAY_TASK_ID.h5
else
    HESSMPI_OUT_DIR=$HESSMPI_RESULTS/$SLURM_JOB_NAME-$SLURM_JOB_ID
    HESSMPI_CHECKPOINT=$HESSMPI_RESULTS/checkpoints/$SLURM_JOB_NAME.h5
fi
mkdir -p "$HESSMPI_OUT_DIR" "$HESSMPI_RESULTS/checkpoints"

hessmpi_run() {
    local script=$1
    shift
    local launch
    case ${HESSMPI_LAUNCHER:-srun} in
        srun) launch=(srun --mpi=pmix --kill-on-bad-exit=1 -n "$HESSMPI_NTASKS") ;;
        mpirun) launch=(mpirun -n "$HESSMPI_NTASKS" --bind-to none) ;;
        *) echo "hessmpi-job.sh: HESSMPI_LAUNCHER must be srun or mpirun, not $HESSMPI_LAUNCHER" >&2
           return 2 ;;
    esac
    echo "$(date +%T) job $SLURM_JOB_ID ($SLURM_JOB_NAME) on ${SLURM_JOB_NODELIST:-?}: $HESSMPI_NTASKS rank(s)," \
         "$HESSMPI_TF_THREADS TensorFlow thread(s) per rank; results in $HESSMPI_OUT_DIR" \
         "(start $((${SLURM_RESTART_COUNT:-0} + 1)))"
    echo "+ ${launch[*]} $HESSMPI_PYTHON $script $*"
    # In the background, so that this shell can pass a signal on while the run goes on.
    "${launch[@]}" "$HESSMPI_PYTHON" "$script" "$@" &
    local pid=$! status=0
    local stopping=0
    trap 'echo "hessmpi-job.sh: $(date +%T): the time limit is near: the run saves its progress";
          stopping=1; kill -USR1 $pid' USR1
    trap 'stopping=1; kill -TERM $pid' TERM
    wait $pid || status=$?
    while kill -0 $pid 2>/dev/null; do  # wait returned for a signal this shell caught: wait for the run
        status=0
        wait $pid || status=$?
    done
    trap - USR1 TERM
    echo "hessmpi-job.sh: $(date +%T): the run ended with status $status"
    # 75: stopped on request, its progress saved. Asked to stop, a run that had not yet set
    # up its signal handlers dies of the signal instead: nothing of it is lost either.
    if ((status == 75 || (stopping && status != 0))); then
        if ((${SLURM_RESTART_COUNT:-0} >= ${HESSMPI_MAX_RESTARTS:-20})); then
            echo "hessmpi-job.sh: not requeued after ${SLURM_RESTART_COUNT:-0} restarts (HESSMPI_MAX_RESTARTS);" \
                 "submit the job again to continue" >&2
        elif echo "hessmpi-job.sh: $(date +%T): requeueing job $SLURM_JOB_ID to continue from its checkpoint" &&
                scontrol requeue "$SLURM_JOB_ID"; then
            sleep 60  # Slurm ends this shell when it requeues the job
        else
            echo "hessmpi-job.sh: the job cannot be requeued (--no-requeue?); submit it again to continue" >&2
        fi
    fi
    return $status
}
