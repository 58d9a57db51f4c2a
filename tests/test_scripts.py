"""scripts/spectrum.py and scripts/verify.py end to end, launched with mpirun as a user would."""

import os

import numpy as np
import pytest

import hessmpi
from hessmpi import data, results
from mpi_util import run_mpi

pytestmark = pytest.mark.serial
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECTRUM = os.path.join(ROOT, "scripts", "spectrum.py")


def softmax_w0_eigenvalues(n):
    """The spectrum of the softmax Hessian at W = 0, independently: 0.1 · eig(XᵀX/N), each 9 times."""
    x = data.load("mnist-5k").split("train", n).features().reshape(n, -1)
    return 0.1 * np.linalg.eigvalsh(x.T @ x / n)[::-1]


def run_spectrum(nprocs, out, *flags):
    proc = run_mpi(nprocs, [SPECTRUM, "--out", out, "--no-plot", *flags], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, results.read(out, "spectrum")


def test_spectrum_under_mpirun_meets_the_contract(tmp_path):
    out = str(tmp_path / "s.h5")
    # PETSc options the solver reads (the defaults, so the numbers are unchanged): no
    # "unknown PETSc option" error and no unused-options warning at exit
    options = ["-hess_eps_type", "krylovschur", "-hess_bv_orthog_refine", "ifneeded",
               "-hess_norm_eps_type", "krylovschur"]
    proc = run_mpi(2, [SPECTRUM, "--n-samples", "300", "--nev", "10", "--out", out, *options], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pass 1" in proc.stdout and proc.stdout.count(f"hessmpi {hessmpi.__version__}") == 1  # progress, rank 0 only
    assert "were not used" not in proc.stdout + proc.stderr, proc.stdout[-2000:]
    datasets, attrs = results.read(out, "spectrum")
    assert os.path.isfile(str(tmp_path / "s.png"))
    assert attrs["n_ranks"] == 2 and attrs["n_samples"] == 300 and attrs["n_params"] == 7840
    assert attrs["model"] == "softmax" and attrs["dataset"] == "mnist-5k" and attrs["dtype"] == "float64"
    assert attrs["n_matvecs"] > 0 and attrs["converged"] == 10 and "spectrum.py" in attrs["command"]
    lam = datasets["spectrum/eigenvalues"]
    vecs = datasets["spectrum/eigenvectors"]
    assert lam.dtype == np.float64 and vecs.shape == (10, 7840)
    exact = softmax_w0_eigenvalues(300)
    np.testing.assert_allclose(lam, [exact[0]] * 9 + [exact[1]], rtol=1e-10)
    assert np.all(datasets["spectrum/residuals"] <= 1e-7 * exact[0])
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(10), atol=1e-8)
    np.testing.assert_array_equal(datasets["model/params"], np.zeros(7840))


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory):
    """(flags, datasets) of one spectrum run on 2 ranks at random weights, shared by the
    rank-count comparisons."""
    tmp = tmp_path_factory.mktemp("reference")
    theta = 0.01 * np.random.default_rng(5).standard_normal(7840)
    np.savez(tmp / "w.npz", params=theta)
    flags = ["--n-samples", "301", "--nev", "4", "--weights", str(tmp / "w.npz")]
    _, (ref, _) = run_spectrum(2, str(tmp / "two.h5"), *flags)
    return flags, ref


@pytest.mark.parametrize("nprocs", [1, 3])
def test_spectrum_is_the_same_on_any_rank_count(tmp_path, nprocs, two_rank_reference):
    flags, ref = two_rank_reference
    # An option of the ST's linear solver, which this solve never runs: it stays unused,
    # and PETSc's own warning names it at exit, once (rank 0), without failing the run.
    unused = ["-hess_st_ksp_converged_reason"]
    proc, (other, attrs) = run_spectrum(nprocs, str(tmp_path / "other.h5"), *flags, *unused)
    assert attrs["n_ranks"] == nprocs
    assert proc.stdout.count("WARNING! There are options you set that were not used!") == 1, proc.stdout[-2000:]
    assert "Option left: name:-hess_st_ksp_converged_reason" in proc.stdout
    np.testing.assert_allclose(other["spectrum/eigenvalues"], ref["spectrum/eigenvalues"],
                               rtol=1e-10, atol=1e-12 * abs(ref["spectrum/eigenvalues"]).max())


def test_cnn_spectrum_in_float32(tmp_path):
    out = str(tmp_path / "cnn.h5")
    _, (datasets, attrs) = run_spectrum(2, out, "--model", "cnn", "--n-samples", "64", "--nev", "3",
                                        "--dtype", "float32", "--max-passes", "2")
    lam, res = datasets["spectrum/eigenvalues"], datasets["spectrum/residuals"]
    assert attrs["n_params"] == 86282 and datasets["spectrum/eigenvectors"].shape == (3, 86282)
    assert np.all(np.diff(lam) <= 0) and lam[0] > 0
    assert np.all(res <= 1e-4 * abs(lam))


def test_bad_flag_gives_one_message_and_no_file(tmp_path):
    out = tmp_path / "bad.h5"
    proc = run_mpi(2, [SPECTRUM, "--nev", "0", "--n-samples", "50", "--out", str(out)], timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("error: --nev must be between 1 and 7839") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_verify_passes_on_the_cnn(tmp_path):
    proc = run_mpi(2, [os.path.join(ROOT, "scripts", "verify.py"), "--model", "cnn", "--n-samples", "40"],
                   timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert proc.stdout.count("ok  ") == 4


def test_a_profiled_run_keeps_its_profile(tmp_path):
    """A script leaves at once after its results are written (cli.policy.exit_now), unless a
    profiler or tracer runs, which writes its file in the interpreter's teardown."""
    profile, out = tmp_path / "run.prof", str(tmp_path / "s.h5")
    proc = run_mpi(1, ["-m", "cProfile", "-o", profile, SPECTRUM, "--n-samples", "50", "--nev", "2",
                       "--max-passes", "1", "--no-plot", "--out", out], timeout=300)
    assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr[-3000:]
    assert profile.stat().st_size > 0
