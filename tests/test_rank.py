"""Tests of hessmpi.rank: the numerical rank of batch Hessians by the dense and the
matrix-free routes, against closed forms (softmax at W = 0 on real digits: the
nonzero eigenvalues are 0.1·eig(XᵀX/n), 9 copies each, so the rank is 9·rank(X)),
against numpy's eigvalsh of Hessians built independently (tests/cases.py), and the
parallel result against the serial one. Runs at any rank count; assertions are
collective. The tests marked serial run scripts/rank_curve.py and scripts/plot.py.
"""

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from mpi4py import MPI

from hessmpi import runtime

runtime.init_petsc()
runtime.configure_threads(1)

import hessmpi  # noqa: E402
from hessmpi import data, plots, results  # noqa: E402
from hessmpi.curvature import regularizers as regularize  # noqa: E402
from hessmpi.errors import HessmpiError  # noqa: E402
from hessmpi.solvers import rank  # noqa: E402

import cases  # noqa: E402
from mpi_util import collective_assert, comm, run_mpi  # noqa: E402

COMM = comm()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "rank_curve.py")
PLOT = os.path.join(ROOT, "scripts", "plot.py")
TOL = rank.default_tol(7840)


# ---------------------------------------------------------------- helpers


def real_digits(n, side=28):
    """The first n training digits of mnist-5k, block-averaged to side × side, (n, side, side, 1)."""
    digits = data.load("mnist-5k").split("train", n)
    f = 28 // side
    return digits.features().reshape(n, side, f, side, f, 1).mean(axis=(2, 4)), digits.y


def softmax(side=28):
    return cases.build_model({"name": "softmax", "config": {"image_size": side}})


def softmax_at_zero(n, comm=COMM):
    """The problem of the softmax model at W = 0 on the first n bundled digits."""
    return hessmpi.Hessian("softmax", "mnist-5k", n_samples=n, comm=comm).problem


def batch_of(model, theta, images, labels, comm=COMM):
    """A rank.Batch over `comm` whose ranks hold contiguous shards of the full data."""
    built = SimpleNamespace(model=model, theta=theta, images=images, labels=labels)
    return rank.Batch.from_problem(cases.problem(built, comm))


def both_routes(batch, tol=TOL, **options):
    return rank.analyse(batch, rank.METHODS, {"dense": tol, "matrix-free": tol}, **options)


def closed_form_softmax_hessian(model, theta, images):
    """(1/n) Σᵢ xᵢxᵢᵀ ⊗ (diag(pᵢ) − pᵢpᵢᵀ), built term by term with np.kron."""
    x = images.reshape(len(images), -1)
    w = theta.reshape(x.shape[1], -1)
    z = x @ w
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    h = sum(np.kron(np.outer(xi, xi), np.diag(pi) - np.outer(pi, pi)) for xi, pi in zip(x, p))
    return h / len(x)


def nonzero_descending(values, tol):
    values = np.sort(values)[::-1]
    return values[np.abs(values) > tol * np.abs(values).max()]


# ---------------------------------------------------------------- softmax at W = 0 on real digits


@pytest.mark.parametrize("n", [1, 5, 10])
def test_softmax_rank_at_zero_is_9n_on_real_digits_by_both_routes(n):
    spectra = both_routes(rank.Batch.from_problem(softmax_at_zero(n)))
    x = data.load("mnist-5k").split("train", n).features().reshape(n, -1)
    rank_x = np.linalg.matrix_rank(x)
    exact = np.repeat(0.1 * np.linalg.eigvalsh(x.T @ x / n)[::-1][:rank_x], 9)
    for method, s in spectra.items():
        found = nonzero_descending(s.values, TOL)
        close = found.shape == exact.shape and np.allclose(found, exact, rtol=1e-10, atol=0)
        collective_assert(s.rank == 9 * n == 9 * rank_x and close and not s.lower_bound,
                          f"{method}: rank {s.rank}, expected 9·{n} (rank(X) = {rank_x}); "
                          f"eigenvalues match the closed form: {close}")
    dense, free = spectra["dense"], spectra["matrix-free"]
    collective_assert(dense.hvp_check < 1e-12 and dense.n_hvps == 2,
                      f"assembled H against HVPs: {dense.hvp_check:.1e}, {dense.n_hvps} HVPs")
    # O(rank) HVPs: at most one product per basis direction (it also gives the direction's
    # Rayleigh–Ritz column) and per probe (at most 16 per step while the basis is below
    # 64 columns), plus the SLEPc norm estimate.
    norm_hvps = free.n_hvps - free.rank - 16 * free.blocks
    collective_assert(free.rank <= free.n_hvps and norm_hvps <= 60,
                      f"matrix-free used {free.n_hvps} HVPs in {free.blocks} steps for rank {free.rank}")


@pytest.fixture(scope="module")
def dependent_images():
    """45 real digits at 7×7, some pixels dead in all of them, so rank(X) = 40 < n."""
    images, labels = real_digits(45, side=7)
    bounds = rank.data_bounds(images.reshape(45, -1))
    assert bounds["rank_x"] < 45 and bounds["dead_pixels"] > 0
    return images, labels, bounds


def test_softmax_rank_is_9_rank_x_when_the_images_are_dependent(dependent_images):
    images, labels, bounds = dependent_images
    model = softmax(7)
    s = rank.analyse(batch_of(model, cases.init(model), images, labels), ("dense",), {"dense": TOL})["dense"]
    expected = 9 * bounds["rank_x"]
    collective_assert(s.rank == expected < 9 * 45 and s.rank <= 9 * (49 - bounds["dead_pixels"]),
                      f"rank {s.rank} at W = 0, expected 9·rank(X) = {expected}")


def test_softmax_rank_at_random_weights_matches_an_independent_hessian(dependent_images):
    images, labels, bounds = dependent_images
    model = softmax(7)
    theta = 0.3 * np.random.default_rng(3).standard_normal(model.n_params)
    h = closed_form_softmax_hessian(model, theta, images)
    reference = np.sort(np.linalg.eigvalsh(h))[::-1]
    spectra = both_routes(batch_of(model, theta, images, labels), n_vectors=3)
    scale = np.abs(reference).max()
    expected_rank = rank.numerical_rank(reference, TOL)
    for method, s in spectra.items():
        found = s.values[:expected_rank]
        ok = s.rank == expected_rank and np.allclose(found, reference[:expected_rank], rtol=0, atol=1e-11 * scale)
        collective_assert(ok, f"{method}: rank {s.rank} vs {expected_rank} from eigvalsh of the closed form")
    # The shift invariance caps the rank at 490 − 49; here the images cap it lower.
    collective_assert(expected_rank == 9 * bounds["rank_x"] <= 441, f"rank {expected_rank}")
    vecs = spectra["dense"].vectors
    residual = np.linalg.norm(h @ vecs.T - vecs.T * spectra["dense"].values[:3]) / scale
    collective_assert(vecs.shape == (3, 490) and residual < 1e-10, f"top eigenvectors: residual {residual:.1e}")


def test_assembled_softmax_hessian_matches_the_closed_form_and_hvps():
    built = cases.build(cases.DENSE_CASES[0])  # softmax at 4×4, random θ and images
    closed = closed_form_softmax_hessian(built.model, built.theta, built.images)
    collective_assert(cases.rel_error(closed, built.H) < 1e-12, "the closed form and the TF Hessian differ")
    spectra = both_routes(batch_of(built.model, built.theta, built.images, built.labels))
    reference = np.sort(np.linalg.eigvalsh(built.H))[::-1]
    for method, s in spectra.items():
        r = s.rank
        collective_assert(r == rank.numerical_rank(reference, TOL)
                          and np.allclose(s.values[:r], reference[:r], rtol=0, atol=1e-12 * reference[0]),
                          f"{method}: rank {r}")
    collective_assert(spectra["dense"].hvp_check < 1e-12, f"HVP check {spectra['dense'].hvp_check:.1e}")


# ---------------------------------------------------------------- the CNN


def test_dense_and_matrix_free_agree_on_a_tiny_cnn():
    case = dict(cases.DENSE_CASES[1], n_samples=2)  # 143 parameters
    built = cases.build(case)
    reference = np.sort(np.linalg.eigvalsh(built.H))[::-1]
    expected = rank.numerical_rank(reference, TOL)
    spectra = both_routes(batch_of(built.model, built.theta, built.images, built.labels))
    scale = np.abs(reference).max()
    for method, s in spectra.items():
        nonzero = reference[np.abs(reference) > TOL * scale]
        found = s.values[np.abs(s.values) > TOL * scale]
        ok = s.rank == expected and found.shape == nonzero.shape and np.allclose(found, nonzero, rtol=0,
                                                                               atol=1e-10 * scale)
        collective_assert(ok, f"{method}: rank {s.rank}, eigvalsh of the TF Hessian gives {expected}")
        collective_assert(s.n_negative == int(np.sum(reference < -TOL * scale)) > 0,
                          f"{method}: {s.n_negative} negative eigenvalues")
    collective_assert(spectra["dense"].n_hvps == 143, f"{spectra['dense'].n_hvps} HVPs for 143 unit vectors")
    collective_assert(expected < 120, f"a rank-deficient case: rank {expected} of 143")


def test_matrix_free_reports_a_lower_bound_when_the_basis_is_capped():
    built = cases.build(dict(cases.DENSE_CASES[1], n_samples=2))
    spectra = rank.analyse(batch_of(built.model, built.theta, built.images, built.labels), ("matrix-free",),
                           {"matrix-free": TOL}, max_rank=20)
    s = spectra["matrix-free"]
    collective_assert(s.lower_bound and s.rank == 20 and s.values.size == 0 and np.all(s.counts() == -1)
                      and np.isnan(s.leading()).all(), f"lower bound {s.lower_bound}, rank {s.rank}")


# ---------------------------------------------------------------- regularized


@pytest.mark.parametrize("side, methods", [(7, ("dense",)), (4, rank.METHODS)])
def test_laplacian_regularized_softmax_hessian_is_full_rank(side, methods):
    n = 12
    images, labels = real_digits(n, side=side)
    model = softmax(side)
    size = model.n_params
    theta = 0.1 * np.random.default_rng(4).standard_normal(size)
    gamma = 1e-2
    h = closed_form_softmax_hessian(model, theta, images)
    reference = np.linalg.eigvalsh(h + gamma * regularize.dense_matrix("laplacian", model))
    batch = batch_of(model, theta, images, labels)
    tols = {m: TOL for m in methods}
    plain = rank.analyse(batch, ("dense",), {"dense": TOL})["dense"]
    rank_x = np.linalg.matrix_rank(images.reshape(n, -1))
    collective_assert(plain.rank == 9 * rank_x < size and plain.minimum == 0.0,
                      f"unregularized: rank {plain.rank}, 9·rank(X) = {9 * rank_x}")
    spectra = rank.analyse(batch, methods, tols, "laplacian", gamma)
    for method, s in spectra.items():
        ok = (s.rank == size and s.minimum > 0 and np.isclose(s.minimum, reference[0], rtol=1e-8, atol=0)
              and np.allclose(np.sort(s.values), reference, rtol=0, atol=1e-11 * reference[-1]))
        collective_assert(ok, f"H + γR, {method}: rank {s.rank} of {size}, smallest eigenvalue {s.minimum:.6e} "
                              f"(eigvalsh {reference[0]:.6e})")
    if COMM.Get_rank() == 0:
        print(f"\nLaplacian-regularized softmax Hessian, {side}×{side} digits, n = {n}, γ = {gamma}: "
              f"rank {size} of {size}, smallest eigenvalue {spectra['dense'].minimum:.4e}")


def test_l2_regularized_hessian_is_shifted_by_gamma():
    built = cases.build(dict(cases.DENSE_CASES[1], n_samples=2))  # tiny CNN: indefinite H
    gamma = 0.5
    reference = np.linalg.eigvalsh(built.H) + gamma
    s = rank.analyse(batch_of(built.model, built.theta, built.images, built.labels), ("dense",),
                     {"dense": TOL}, "l2", gamma)["dense"]
    collective_assert(np.allclose(np.sort(s.values), reference, rtol=0, atol=1e-11 * np.abs(reference).max())
                      and s.rank == rank.numerical_rank(reference, TOL), f"rank {s.rank}")


# ---------------------------------------------------------------- parallel = serial


@pytest.mark.parametrize("which", ["softmax", "cnn"])
def test_parallel_curve_matches_serial(which):
    if COMM.Get_size() == 1:
        pytest.skip("compares COMM_WORLD with COMM_SELF: runs in the mpirun -n 2 and -n 3 passes")
    if which == "softmax":
        model = softmax(7)
        images, labels = real_digits(13, side=7)
        theta = 0.2 * np.random.default_rng(5).standard_normal(model.n_params)
        sizes, methods = (3, 13), rank.METHODS
    else:
        built = cases.build(dict(cases.PARALLEL_CASES[0], n_samples=5), dense=False)
        model, theta, images, labels = built.model, built.theta, built.images, built.labels
        sizes, methods = (5,), ("matrix-free",)
    curves = {}
    for name, c in (("parallel", COMM), ("serial", MPI.COMM_SELF)):
        curves[name] = [rank.analyse(batch_of(model, theta, images[:n], labels[:n], comm=c), methods,
                                     {"dense": TOL, "matrix-free": TOL}) for n in sizes]
    for n, par, ser in zip(sizes, curves["parallel"], curves["serial"]):
        for method in methods:
            p, s = par[method], ser[method]
            same = p.rank == s.rank and p.values.shape == s.values.shape and np.allclose(
                p.values, s.values, rtol=0, atol=1e-11 * np.abs(s.values).max())
            collective_assert(same, f"{which} {method}, n = {n}: rank {p.rank} on {COMM.Get_size()} ranks, "
                                    f"{s.rank} on 1")


# ---------------------------------------------------------------- small pieces


def test_default_tolerance_and_numerical_rank():
    collective_assert(rank.default_tol(7840) == 7840 * np.finfo(np.float64).eps
                      and rank.default_tol(10, "float32") == 10 * np.finfo(np.float32).eps, "tolerance rule")
    values = np.array([2.0, -1.0, 1e-9, 1e-13, 0.0])
    collective_assert(rank.numerical_rank(values, 1e-10) == 3 and rank.numerical_rank(values, 1e-8) == 2
                      and rank.numerical_rank([], 1e-10) == 0 and rank.numerical_rank([0.0], 1e-10) == 0,
                      "numerical_rank counts |λ| > tol·max|λ|")


def test_batch_sizes_are_parsed_and_checked():
    collective_assert(rank.parse_batch_sizes("10, 1,5,5", 100) == [1, 5, 10], "sorted, duplicates dropped")
    collective_assert(rank.parse_batch_sizes(None, 4000) == [1, 5, 10, 50, 100, 200, 500, 1000, 4000]
                      and rank.parse_batch_sizes(None, 20000)[-1] == 5000
                      and rank.parse_batch_sizes(None, 7) == [1, 5, 7], "defaults up to the available count")
    messages = {}
    for text in ("1,x,3", "1,,3", "0,5", "-2", "5,4001"):
        try:
            rank.parse_batch_sizes(text, 4000)
            messages[text] = None
        except HessmpiError as e:
            messages[text] = str(e)
    collective_assert(all(messages.values()) and "4000" in messages["5,4001"] and "'x'" in messages["1,x,3"],
                      f"{messages}")


def test_data_bounds_count_dead_pixels_and_couplings():
    x = np.zeros((3, 4))
    x[0, [0, 1]] = 1.0
    x[1, [1, 2]] = 2.0
    x[2, [0, 1]] = 3.0  # row 2 = 3·row 0
    b = rank.data_bounds(x)
    expected = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=np.uint8)
    collective_assert(b["dead_pixels"] == 1 and b["rank_x"] == 2 and np.array_equal(b["pattern"], expected), f"{b}")


# ---------------------------------------------------------------- the scripts, end to end


def _softmax_w0_ranks(sizes):
    x = data.load("mnist-5k").split("train", max(sizes)).features()
    x = x.reshape(len(x), -1)
    return [9 * np.linalg.matrix_rank(x[:n]) for n in sizes], x


@pytest.mark.serial
def test_rank_curve_script_under_mpirun_meets_the_contract(tmp_path):
    out = str(tmp_path / "rc.h5")
    sizes = [1, 5, 20]
    proc = run_mpi(2, [SCRIPT, "--batch-sizes", ",".join(map(str, sizes)), "--method", "both", "--out", out],
                   timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"hessmpi {hessmpi.__version__}") == 1 and "n=   20: rank 180 (dense 180, matrix-free 180)" in proc.stdout
    datasets, attrs = results.read(out, "rank_curve")
    expected, x = _softmax_w0_ranks(sizes)
    rc = lambda name: datasets["rank_curve/" + name]  # noqa: E731
    assert list(rc("batch_sizes")) == sizes and list(rc("ranks")) == expected == [9 * n for n in sizes]
    assert list(rc("dense/ranks")) == expected and list(rc("matrix_free/ranks")) == expected
    assert attrs["ranks_agree"] == 1 and attrs["n_ranks"] == 2 and attrs["n_samples"] == 20
    assert attrs["tol"] == TOL and "epsilon" in attrs["tol_rule"] and attrs["method"] == "dense,matrix-free"
    assert attrs["n_matvecs"] == rc("hvps").sum() > 0 and np.all(rc("seconds") > 0)
    assert list(rc("dead_pixels")) == [int(np.sum(~(x[:n] != 0).any(0))) for n in sizes]
    assert list(rc("cap_9_rank_x")) == expected and int(rc("cap_shift_invariance")) == 7056
    assert rc("pixel_pattern").shape == (3, 784, 784) and rc("counts").shape == (3, len(rank.THRESHOLDS))
    assert np.all(rc("dense/hvp_check") < 1e-12) and np.all(rc("matrix_free/hvps") > rc("ranks"))
    vecs = rc("top_eigenvectors")
    assert vecs.shape == (4, 7840) and np.allclose(vecs @ vecs.T, np.eye(4), atol=1e-10)
    # The same curve serially, in this process: the leading eigenvalues agree.
    for i, n in enumerate(sizes):
        serial = rank.dense_softmax(rank.Batch.from_problem(softmax_at_zero(n, MPI.COMM_SELF)), TOL)
        assert serial.rank == rc("ranks")[i]
        np.testing.assert_allclose(rc("leading_eigenvalues")[i], serial.leading(), rtol=1e-12)
    for suffix in ("", "_spy", "_eigenvectors"):
        assert os.path.getsize(str(tmp_path / f"rc{suffix}.png")) > 1000
    # scripts/plot.py redraws them from the file, and dispatches a spectrum file too.
    plot = subprocess.run([sys.executable, PLOT, out, "--prefix", str(tmp_path / "again")],
                          capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert os.path.isfile(str(tmp_path / "again_spy.png")) and os.path.isfile(str(tmp_path / "again.png"))
    spec = str(tmp_path / "s.h5")
    results.write(spec, {"spectrum/eigenvalues": np.array([2.0, 1.0]), "spectrum/eigenvectors": np.eye(2, 5),
                         "spectrum/residuals": np.array([1e-9, 1e-9])},
                  {k: attrs[k] for k in results.ROOT_ATTRS})
    assert plots.draw_file(spec) == [str(tmp_path / "s.png")] and os.path.isfile(str(tmp_path / "s.png"))
    results.write(str(tmp_path / "odd.h5"), {"other/thing": np.zeros(2)}, {k: attrs[k] for k in results.ROOT_ATTRS})
    with pytest.raises(HessmpiError, match="holds none of the known result sets"):
        plots.draw_file(str(tmp_path / "odd.h5"))
    with pytest.raises(HessmpiError, match="no results file"):
        plots.draw_file(str(tmp_path / "missing.h5"))
    odd = subprocess.run([sys.executable, PLOT, str(tmp_path / "odd.h5")], capture_output=True, text=True, timeout=120)
    assert odd.returncode == 2 and odd.stderr.count("error: ") == 1, odd.stderr


@pytest.mark.serial
def test_rank_curve_script_rejects_bad_batch_sizes_once(tmp_path):
    out = str(tmp_path / "bad.h5")
    proc = run_mpi(2, [SCRIPT, "--batch-sizes", "1,five", "--out", out], timeout=200)
    assert proc.returncode == 2 and proc.stderr.count("'five' is not an integer") == 1, proc.stderr[-2000:]
    assert not os.path.exists(out)


@pytest.mark.serial
def test_cnn_rank_curve_gives_a_lower_bound_when_capped(tmp_path):
    out = str(tmp_path / "cnn.h5")
    proc = run_mpi(2, [SCRIPT, "--model", "cnn", "--batch-sizes", "1,2", "--max-rank", "24", "--dtype", "float32",
                       "--out", out, "--no-plot"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    datasets, attrs = results.read(out, "rank_curve")
    assert list(datasets["rank_curve/ranks"]) == [24, -1]
    assert list(datasets["rank_curve/rank_is_lower_bound"]) == [1, 0]
    assert "rank ≥ 24" in proc.stdout and attrs["converged"] == 0 and attrs["n_params"] == 86282
    assert attrs["tol_matrix_free"] == rank.default_tol(86282, "float32")


def test_a_stopped_rank_curve_continues_from_its_checkpoint(shared_tmp_path):
    """A stop request (hessmpi.stop) at the second batch size's products: Interrupted on every
    rank naming the checkpoint, which holds the first batch size; run again, the curve skips
    it and ends with the uninterrupted curve's numbers (every dataset but the timings), and
    the checkpoint is removed once the result is saved."""
    from hessmpi import stop
    from hessmpi.errors import Interrupted

    op = hessmpi.Hessian("softmax", "mnist-5k", n_samples=60)
    sizes, quiet = "1,5,20,60", (lambda line: None)
    whole = hessmpi.rank_curve(op, sizes, log=quiet)
    path = str(shared_tmp_path / "curve.ckpt")
    products = []  # each batch size has an operator of its own, which calls op's on_matvec

    def count(o):
        products.append(1)
        if len(products) == 3:  # the second batch size's first product: 2 check each size's matrix
            stop.request()
    op.on_matvec = count
    try:
        hessmpi.rank_curve(op, sizes, log=quiet, checkpoint=path)
        message = ""
    except Interrupted as e:
        message = str(e)
    finally:
        op.on_matvec = None
        stop.clear()
    lines = []
    curve = hessmpi.rank_curve(op, sizes, log=lines.append, checkpoint=path)
    curve.save(str(shared_tmp_path / "curve.h5"))  # rank 0 writes it, then removes the checkpoint
    COMM.Barrier()
    timings = ("rank_curve/seconds", "rank_curve/dense/seconds")
    differ = [k for k, v in whole.datasets.items() if k not in timings
              and not np.array_equal(curve.datasets[k], v, equal_nan=v.dtype.kind == "f")]
    collective_assert(f"progress saved to {path}" in message and curve.attrs["resumed_after_batch"] == 1
                      and any("batch sizes 1 done before" in line for line in lines) and not differ
                      and list(curve.ranks) == [9, 45, 180, 540] and not os.path.exists(path),
                      f"{message!r}; resumed after {curve.attrs['resumed_after_batch']}; differ {differ}; "
                      f"ranks {list(curve.ranks)}")
