# The software environment of every hessmpi job: the one file to edit for a site.
# Sourced by jobs/hessmpi-job.sh, in the project folder ($HESSMPI_HOME), under `set -eu`.
# It must leave HESSMPI_PYTHON naming the Python that has hessmpi, mpi4py, petsc4py,
# slepc4py and TensorFlow (sbatch passes the submitter's PATH, whose first python may
# have none of them, so the jobs never rely on a bare `python`).
#
# On a cluster, replace the default below by the site's modules and your venv, e.g.
#   module purge
#   module load openmpi/4.1 petsc/3.18 slepc/3.18 py-mpi4py py-petsc4py py-slepc4py tensorflow
#   . "$HOME/venvs/hessmpi/bin/activate"      # made with --system-site-packages
#   HESSMPI_PYTHON=$(command -v python)

# Default: the project's .venv made by `make setup` (Debian 12). Its activate script
# also exports the Open MPI variables that allow running as root.
if [[ -z ${HESSMPI_PYTHON:-} ]]; then
    if [[ ! -x .venv/bin/python ]]; then
        echo "site-env.sh: no .venv in $PWD; run make setup, or edit jobs/site-env.sh for your site" >&2
        return 1
    fi
    set +u  # activate scripts are not written for nounset
    . .venv/bin/activate
    set -u
    HESSMPI_PYTHON=$PWD/.venv/bin/python
fi
