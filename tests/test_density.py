"""Stochastic Lanczos quadrature, trace estimates and eigenvalue error bars against exact
answers: numpy's eigvalsh of dense Hessians of tiny models, the closed form of the
softmax Hessian at W = 0 on real digits (7,840 parameters), and dense per-group
Hessians. The stochastic checks compare with the *exact* standard error of each
estimator (computed from the dense matrix) and use fixed seeds, so they cannot flake;
the deterministic ones (Gauss quadrature exactness, the CMS bracket, Hutch++ on a
low-rank matrix, rank-count independence) are checked to rounding.

Runs at any rank count; assertions are collective. The script tests at the end are
serial: they launch mpirun themselves.
"""

import os

import numpy as np
import pytest
from mpi4py import MPI

from hessmpi import runtime

runtime.init_petsc()
runtime.configure_threads(1)

import hessmpi  # noqa: E402
from hessmpi import data, results  # noqa: E402
from hessmpi.curvature import petsc  # noqa: E402
from hessmpi.errors import DataError  # noqa: E402
from hessmpi.solvers import errorbars, trace  # noqa: E402
from hessmpi.solvers import slq as density  # noqa: E402

import cases  # noqa: E402
from mpi_util import collective_assert, comm, run_mpi  # noqa: E402

COMM = comm()
PROBES, STEPS, SEED = 16, 5, 3


class Shell:
    """A shell matrix over a DistributedOperator; destroyed explicitly on every rank."""

    def __init__(self, op):
        self.op = op
        self.mat = petsc.shell_matrix(op)

    def slq(self, probes=PROBES, steps=STEPS, seed=SEED, distribution="rademacher"):
        return density.slq(self.mat, probes, steps, seed, distribution, matvec_counter=lambda: self.op.n_matvecs)

    def destroy(self):
        self.mat.destroy()


def probe_vectors(n, probes=PROBES, seed=SEED, distribution="rademacher"):
    """The unit probes SLQ uses, built here from density.probe."""
    z = np.array([density.probe(n, seed, p, distribution) for p in range(probes)])
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def exact_stderr(B, probes):
    """The exact standard error of the mean of `probes` samples zᵀBz/n, z Rademacher:
    Var(zᵀBz) = 2(‖B‖²_F − Σᵢ Bᵢᵢ²)."""
    n = len(B)
    return np.sqrt(2 * (np.sum(B * B) - np.sum(np.diag(B) ** 2))) / n / np.sqrt(probes)


@pytest.fixture(scope="module", params=cases.DENSE_CASES, ids=lambda c: c["id"])
def tiny(request):
    """A tiny model at a random point, its dense Hessian and SLQ of it. The dense Hessian is
    the columns of a one-rank operator over all the data, which test_operator.py checks
    against nested tapes (to 1e-10): the exact reference for what SLQ does with it."""
    built = cases.build(request.param, dense=False)
    built.shell = Shell(cases.hessian_operator(built, COMM))
    alone = cases.hessian_operator(built, MPI.COMM_SELF)  # no messages: fast under mpirun
    built.H = np.column_stack([alone.apply_full(e) for e in np.eye(built.model.n_params)])
    built.H = (built.H + built.H.T) / 2  # symmetric to rounding already; exactly so for eigh
    built.eigenvalues, built.eigenvectors = np.linalg.eigh(built.H)
    built.q = built.shell.slq()
    yield built
    built.shell.destroy()


# ---------------------------------------------------------------- Lanczos and Gauss quadrature


def test_gauss_rules_reproduce_the_probes_moments_exactly(tiny):
    """Σₖ τₖ θₖʲ = vᵀHʲv for j ≤ 2m − 1, for each probe v: Lanczos is right to rounding."""
    H, q = tiny.H, tiny.q
    V = probe_vectors(len(H))
    worst = 0.0
    for j in range(1, 2 * STEPS):
        Hj = np.linalg.matrix_power(H, j)
        exact = np.einsum("pi,ij,pj->p", V, Hj, V)
        got = q.per_probe(lambda t: t ** j)
        worst = max(worst, np.abs(got - exact).max() / np.abs(tiny.eigenvalues).max() ** j)
    collective_assert(worst <= 1e-10 and np.all(q.steps == STEPS) and q.n_matvecs == PROBES * STEPS,
                      f"quadrature vs vᵀHʲv: worst error {worst:.2e}·‖H‖ʲ; steps {q.steps}, "
                      f"{q.n_matvecs} products")


def test_full_reorthogonalization_finds_every_eigenvalue():
    """n steps on an n × n matrix with a wide spread (1 … 1e4): the Ritz values are the
    eigenvalues. Without reorthogonalization, Lanczos returns ghost copies instead."""
    n = 60
    rng = np.random.default_rng(40)
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    d = np.geomspace(1.0, 1e4, n)
    shell = Shell(cases.sum_of_terms_operator(d, Q, COMM))
    try:
        q = shell.slq(probes=1, steps=n)
    finally:
        shell.destroy()
    nodes, weights = q.rules()[0]
    v = probe_vectors(n, 1)[0]
    error = np.abs(nodes - d).max() / d.max() if len(nodes) == n else np.inf
    weight_error = np.abs(weights - (Q.T @ v) ** 2).max() if len(nodes) == n else np.inf
    collective_assert(error <= 1e-10 and weight_error <= 1e-8,
                      f"{len(nodes)} Ritz values for {n} eigenvalues, error {error:.2e}, weights {weight_error:.2e}")


def test_lanczos_stops_when_the_krylov_space_is_invariant():
    """5 copies of 5, 3 of 3 and 32 distinct values: 34 distinct eigenvalues, so Lanczos
    stops after 34 steps and its rule is the probe's measure exactly. (The matrix is
    diagonal so that the copies are exactly equal: rotated by a random Q they split by
    rounding, and Lanczos rightly goes on to resolve the split.)"""
    case = cases.DEGENERATE_CASE
    n = case["n"]
    Q = np.eye(n)
    clusters = [value for value, copies in case["clusters"] for _ in range(copies)]
    d = np.concatenate([clusters, np.linspace(*case["rest"], n - len(clusters))])
    shell = Shell(cases.sum_of_terms_operator(d, Q, COMM))
    try:
        q = shell.slq(probes=2, steps=n)
    finally:
        shell.destroy()
    distinct = np.unique(d)
    ok, msg = True, []
    for (nodes, weights), v in zip(q.rules(), probe_vectors(n, 2)):
        mass = np.array([np.sum((Q[:, d == value].T @ v) ** 2) for value in distinct])
        good = len(nodes) == len(distinct)
        if good:
            good = np.abs(nodes - distinct).max() <= 1e-10 * d.max() and np.abs(weights - mass).max() <= 1e-10
        ok &= good
        msg.append(f"{len(nodes)} nodes for {len(distinct)} distinct eigenvalues")
    collective_assert(ok and list(q.steps) == [len(distinct)] * 2, "; ".join(msg))


# ---------------------------------------------------------------- density and moments


def test_slq_moments_match_the_exact_eigenvalues(tiny):
    """Estimates of (1/n) tr(Hᵏ) within 4 exact standard errors of the eigenvalues' moments;
    the stated standard error is the probes' sample standard deviation / √P. (Whether
    that sample deviation is close to the exact one depends on the tails of vᵀHᵏv: for
    the tiny CNN with 16 probes it is 3× too small, see docs/density.md.)"""
    H, lam, q = tiny.H, tiny.eigenvalues, tiny.q
    report, ok = [], True
    for k, m in enumerate(density.moments(q, 4), 1):
        exact = np.mean(lam ** k)
        se = exact_stderr(np.linalg.matrix_power(H, k), PROBES)
        samples = q.per_probe(lambda t: t ** k)
        ok &= abs(m.value - exact) <= 4 * se and np.isclose(m.stderr, samples.std(ddof=1) / np.sqrt(PROBES))
        report.append(f"k={k}: {m.value:.6g} ± {m.stderr:.2g} vs exact {exact:.6g} (exact se {se:.2g})")
    collective_assert(ok, "; ".join(report))


def test_density_integrates_to_one_and_keeps_the_moments(tiny):
    q = tiny.q
    width = density.default_width(q)
    grid = density.linear_grid(q, width)
    phi = density.smooth(q, grid, width)
    m1, m2 = (m.value for m in density.moments(q, 2))
    total = np.trapz(phi, grid)
    mean = np.trapz(grid * phi, grid)
    second = np.trapz(grid ** 2 * phi, grid)  # smoothing adds σ² to the second moment
    eps = density.zero_threshold(q, 1e-8)
    logd = density.log_density(q, eps)
    log_total = np.trapz(logd.positive + logd.negative, logd.grid) + logd.zero_mass
    lo, hi = density.spectral_range(q)
    lam = tiny.eigenvalues
    scale = np.abs(lam).max()
    collective_assert(abs(total - 1) <= 1e-6 and abs(mean - m1) <= 1e-6 * scale
                      and abs(second - (m2 + width ** 2)) <= 1e-6 * scale ** 2 and abs(log_total - 1) <= 1e-6
                      and lam[0] - 1e-10 * scale <= lo and hi <= lam[-1] + 1e-10 * scale and np.all(phi >= 0),
                      f"∫φ = {total}, mean {mean} vs {m1}, second {second} vs {m2 + width ** 2}, "
                      f"log view total {log_total}; Ritz range [{lo}, {hi}] vs [{lam[0]}, {lam[-1]}]")


def test_mass_below_is_bracketed(tiny):
    """The mean CMS bracket contains the probes' exact mass below x, for x at zero and
    inside the spectrum; the estimate lies in the bracket."""
    lam, U, q = tiny.eigenvalues, tiny.eigenvectors, tiny.q
    V = probe_vectors(len(lam))
    report, ok = [], True
    for x in [-density.zero_threshold(q, 1e-8), np.quantile(lam, 0.3), np.quantile(lam, 0.8)]:
        exact = np.mean(((V @ U[:, lam < x]) ** 2).sum(axis=1))
        m = density.mass_below(q, x)
        ok &= m.lower - 1e-12 <= exact <= m.upper + 1e-12 and m.lower <= m.estimate.value <= m.upper
        report.append(f"x={x:.3g}: [{m.lower:.4f}, {m.upper:.4f}] ∋ {exact:.4f}? estimate {m.estimate.value:.4f}")
    collective_assert(ok, "; ".join(report))


def test_the_same_density_at_any_rank_count():
    """SLQ over this rank count's shards equals SLQ on one rank holding all the data."""
    built = cases.build(cases.PARALLEL_CASES[0], dense=False)  # the tiny CNN, 11 samples
    here, alone = Shell(cases.hessian_operator(built, COMM)), Shell(cases.hessian_operator(built, MPI.COMM_SELF))
    try:
        qa, qb = here.slq(probes=3, steps=6), alone.slq(probes=3, steps=6)
    finally:
        here.destroy()
        alone.destroy()
    width = density.default_width(qb)
    grid = density.linear_grid(qb, width)
    gap = np.abs(density.smooth(qa, grid, width) - density.smooth(qb, grid, width)).max()
    peak = density.smooth(qb, grid, width).max()
    alpha_gap = np.nanmax(np.abs(qa.alphas - qb.alphas)) / np.nanmax(np.abs(qb.alphas))
    collective_assert(alpha_gap <= 1e-10 and gap <= 1e-8 * peak and np.array_equal(qa.steps, qb.steps),
                      f"{COMM.size} ranks vs 1: alphas differ by {alpha_gap:.2e}, densities by {gap / peak:.2e}")


# ---------------------------------------------------------------- trace and Frobenius norm


def test_trace_and_frobenius_within_their_errors(tiny):
    H, q = tiny.H, tiny.q
    n = len(H)
    est = trace.from_quadrature(q)
    direct = trace.hutchinson(tiny.shell.mat, PROBES, SEED)
    tr, fro2 = np.trace(H), np.sum(H * H)
    se_tr = n * exact_stderr(H, PROBES)
    se_fro2 = n * exact_stderr(H @ H, PROBES)
    fro = est.frobenius
    ok = (abs(est.trace.value - tr) <= 4 * se_tr and abs(est.frobenius_sq.value - fro2) <= 4 * se_fro2
          and abs(fro.value - np.sqrt(fro2)) <= 4 * se_fro2 / (2 * np.sqrt(fro2))
          and np.isclose(fro.stderr, est.frobenius_sq.stderr / (2 * fro.value))
          and abs(direct.trace.value - est.trace.value) <= 1e-10 * abs(tr)
          and abs(direct.frobenius_sq.value - est.frobenius_sq.value) <= 1e-10 * fro2)
    collective_assert(ok, f"trace {est.trace} vs {tr} (exact se {se_tr:.3g}); ‖H‖²_F {est.frobenius_sq} vs "
                          f"{fro2} (exact se {se_fro2:.3g}); ‖H‖_F {fro} vs {np.sqrt(fro2)}; "
                          f"hutchinson() {direct.trace.value} vs SLQ {est.trace.value}")


def test_hutchpp_within_its_error(tiny):
    start = tiny.shell.op.n_matvecs
    pp = trace.hutchpp(tiny.shell.mat, 30, SEED)
    tr = np.trace(tiny.H)
    used = tiny.shell.op.n_matvecs - start
    collective_assert(abs(pp.trace.value - tr) <= 4 * pp.trace.stderr and pp.n_matvecs == used == 30
                      and pp.sketch_rank == 10,
                      f"Hutch++ {pp.trace} vs {tr}; {used} products (reported {pp.n_matvecs}), "
                      f"sketch rank {pp.sketch_rank}")


def test_hutchpp_is_exact_on_a_low_rank_hessian():
    """Softmax on one sample: H = xxᵀ ⊗ (diag(p) − ppᵀ) has rank 9; a sketch of 10 holds it."""
    built = cases.build(cases.PARALLEL_CASES[2])  # softmax, N = 1
    shell = Shell(cases.hessian_operator(built, COMM))
    try:
        pp = trace.hutchpp(shell.mat, 30, SEED)
    finally:
        shell.destroy()
    tr = np.trace(built.H)
    rank = np.linalg.matrix_rank(built.H, tol=1e-10 * np.abs(built.H).max())
    collective_assert(rank == 9 and pp.sketch_rank == 9 and abs(pp.trace.value - tr) <= 1e-10 * tr
                      and pp.trace.stderr <= 1e-10 * tr and pp.n_matvecs == 10 + 9 + 10,
                      f"rank {rank}, sketch rank {pp.sketch_rank}, Hutch++ {pp.trace} vs {tr}, "
                      f"{pp.n_matvecs} products")


@pytest.fixture(scope="module")
def digits():
    try:
        return data.load("mnist-5k")
    except DataError as e:  # the same on every rank
        pytest.skip(str(e))


def test_softmax_at_zero_on_real_digits(digits):
    """The 7,840-parameter Hessian at W = 0: H = C ⊗ A with C = XᵀX/N, A = diag(p) − ppᵀ,
    so tr(Hᵏ) = tr(Cᵏ)·tr(Aᵏ) and the exact standard errors follow from C and A."""
    N, probes, steps = 60, 8, 6
    X = digits.train_images[:N].reshape(N, -1) / 255.0
    C = X.T @ X / N
    A = 0.1 * np.eye(10) - 0.01
    shell = Shell(hessmpi.Hessian("softmax", digits.split("train", N), comm=COMM))
    try:
        q = shell.slq(probes, steps)
        pp = trace.hutchpp(shell.mat, 30, SEED)
    finally:
        shell.destroy()
    n = 7840
    report, ok = [], True
    for k, m in enumerate(density.moments(q, 4), 1):
        Ck, Ak = np.linalg.matrix_power(C, k), np.linalg.matrix_power(A, k)
        exact = np.trace(Ck) * np.trace(Ak) / n
        var = 2 * (np.sum(Ck ** 2) * np.sum(Ak ** 2) - np.sum(np.diag(Ck) ** 2) * np.sum(np.diag(Ak) ** 2))
        se = np.sqrt(var) / n / np.sqrt(probes)
        ok &= abs(m.value - exact) <= 4 * se
        report.append(f"k={k}: {m.value:.6g} vs {exact:.6g} (se {se:.2g})")
    lam_max = 0.1 * np.linalg.eigvalsh(C)[-1]
    lo, hi = density.spectral_range(q)
    tr = 0.9 * np.trace(C)
    ok &= -1e-10 * lam_max <= lo and abs(hi - lam_max) <= 1e-8 * lam_max
    ok &= abs(pp.trace.value - tr) <= 4 * pp.trace.stderr
    collective_assert(ok, "; ".join(report) + f"; Ritz range [{lo}, {hi}] vs λmax {lam_max}; "
                                              f"Hutch++ {pp.trace} vs {tr}")


# ---------------------------------------------------------------- error bars


@pytest.fixture(scope="module")
def softmax_samples():
    """The tiny softmax case (11 samples) with its per-sample Hessians in closed form,
    numpy only: Hᵢ = xᵢxᵢᵀ ⊗ (diag(pᵢ) − pᵢpᵢᵀ), θ index pixel·10 + class."""
    built = cases.build(cases.DENSE_CASES[0], dense=False)
    X = built.images.reshape(len(built.labels), -1)
    logits = X @ built.theta.reshape(X.shape[1], 10)
    P = np.exp(logits - logits.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    built.X, built.A = X, [np.diag(p) - np.outer(p, p) for p in P]
    built.H = sum(np.kron(np.outer(x, x), A) for x, A in zip(X, built.A)) / len(X)
    built.eigenvalues, built.eigenvectors = np.linalg.eigh(built.H)
    return built


def expected_spread(built, vectors, G, confidence=0.95):
    """Group quotients and the t-interval, from the closed-form per-sample quotients
    vᵀHᵢv = uᵀAᵢu with u = Vᵀxᵢ (V = v as a pixels × 10 matrix)."""
    from scipy import stats

    N = len(built.X)
    per_sample = np.array([[(V.T @ x) @ A @ (V.T @ x) / np.sum(V * V) for x, A in zip(built.X, built.A)]
                           for V in vectors.reshape(len(vectors), -1, 10)])  # (K, N)
    bounds = [data.shard_range(N, G, g) for g in range(G)]
    r = np.array([per_sample[:, a:b].mean(axis=1) for a, b in bounds])  # (G, K)
    n_g = np.array([b - a for a, b in bounds], dtype=float)
    mean = per_sample.mean(axis=1)
    if G == 1:
        return r, mean, np.full(len(vectors), np.nan), np.full(len(vectors), np.nan)
    se = np.sqrt(((r - mean) ** 2 * n_g[:, None]).sum(axis=0) / (G - 1) / N)
    return r, mean, se, stats.t.ppf(0.5 + confidence / 2, G - 1) * se


@pytest.mark.parametrize("n_groups", [None, 3, 1])
def test_error_bars_match_closed_form_group_quotients(softmax_samples, n_groups):
    """Group quotients, estimate, standard error and t-interval equal those of the
    closed-form per-sample Hessians; the estimate of an eigenvector is its eigenvalue; the
    group products add up to H·v (what the spectrum's true residuals are taken from).
    None: a group per rank. With one group there is no interval (NaN)."""
    built = softmax_samples
    lam, U = built.eigenvalues, built.eigenvectors
    vectors = np.vstack([U[:, [-1, -2, 0]].T, np.random.default_rng(7).standard_normal(len(lam))])
    N = len(built.labels)
    problem = cases.problem(built, COMM, micro_batch=2)
    got = errorbars.rayleigh_spread(problem.curvature.hvp, vectors, problem.shard, N, COMM, n_groups,
                                    scale=1.0 / N)
    G = n_groups or COMM.size
    r, mean, se, half = expected_spread(built, vectors, G)
    scale = np.abs(lam).max()
    close = lambda a, b: np.allclose(a, b, rtol=1e-9, atol=1e-12 * scale, equal_nan=True)  # noqa: E731
    ok = (close(got.quotients, r) and close(got.estimate, mean) and close(got.stderr, se)
          and close(got.high - got.estimate, half) and close(got.estimate - got.low, half)
          and np.allclose(got.estimate[:3], lam[[-1, -2, 0]], atol=1e-10 * scale)
          and got.dof == G - 1 and got.sizes.sum() == N and (G > 1 or np.all(np.isnan(got.low)))
          and np.allclose(got.products, vectors @ built.H, rtol=1e-9, atol=1e-12 * scale))
    collective_assert(ok, f"G={G}: estimate {got.estimate} vs {mean}; stderr {got.stderr} vs {se}; "
                          f"interval half-widths {got.high - got.estimate} vs {half}; products off by "
                          f"{np.abs(got.products - vectors @ built.H).max():.1e}")


# ---------------------------------------------------------------- scripts/density.py end to end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "density.py")
FLAGS = ["--n-samples", "100", "--probes", "3", "--lanczos-steps", "12", "--hutchpp", "9"]


def run_density(nprocs, *flags, timeout=300):
    proc = run_mpi(nprocs, [SCRIPT, *flags], timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.serial
def test_density_script_on_two_ranks_equals_one_rank_and_resmooths(tmp_path):
    """At a random point (no exactly repeated eigenvalues; at W = 0 every eigenvalue is
    9-fold and the tridiagonals' late entries depend on rounding, see docs/density.md)."""
    two, wide, weights = str(tmp_path / "two.h5"), str(tmp_path / "wide.h5"), str(tmp_path / "w.npz")
    theta = 0.01 * np.random.default_rng(5).standard_normal(7840)
    np.savez(weights, params=theta)
    proc = run_density(2, *FLAGS, "--weights", weights, "--out", two)
    b, attrs = results.read(two, "density")
    assert os.path.isfile(str(tmp_path / "two.png")) and proc.stdout.count(f"hessmpi {hessmpi.__version__}") == 1
    assert attrs["n_ranks"] == 2 and attrs["n_matvecs"] == 3 * 12 + 9 and attrs["operator"] == "hessian"
    assert attrs["probes"] == 3 and attrs["lanczos_steps"] == 12 and attrs["operator_size"] == 7840
    np.testing.assert_array_equal(b["model/params"], theta)

    # the same quadrature on one rank, here, through the library
    alone = hessmpi.Hessian("softmax", "mnist-5k", n_samples=100, params=theta, comm=MPI.COMM_SELF)
    shell = Shell(alone)
    try:
        q1 = shell.slq(probes=3, steps=12, seed=0)
        pp = trace.hutchpp(shell.mat, 9, 0)
    finally:
        shell.destroy()
    np.testing.assert_allclose(b["density/alphas"], q1.alphas, rtol=1e-10)
    np.testing.assert_allclose(b["density/betas"], q1.betas, rtol=1e-10)
    width = float(b["density/width"])
    np.testing.assert_allclose(b["density/values"], density.smooth(q1, b["density/grid"], width), rtol=1e-8,
                               atol=1e-10 * b["density/values"].max())
    one = trace.from_quadrature(q1)
    assert abs(b["trace/estimate"] - one.trace.value) <= 1e-10 * one.trace.value
    assert abs(b["trace/stderr"] - one.trace.stderr) <= 1e-8 * one.trace.stderr
    assert abs(b["trace/hutchpp/estimate"] - pp.trace.value) <= 1e-10 * pp.trace.value
    assert abs(np.trapz(b["density/values"], b["density/grid"]) - 1) <= 1e-6

    run_density(1, "--from", two, "--width", "0.05", "--out", wide, "--no-plot")
    c, cattrs = results.read(wide, "density")
    np.testing.assert_array_equal(c["density/alphas"], b["density/alphas"])
    np.testing.assert_allclose(c["density/values"], density.smooth(q1, c["density/grid"], 0.05), rtol=1e-8,
                               atol=1e-10 * c["density/values"].max())
    assert c["density/width"] == 0.05 and cattrs["resmoothed_from"] == os.path.abspath(two)
    assert cattrs["n_matvecs"] == attrs["n_matvecs"] and c["trace/hutchpp/estimate"] == b["trace/hutchpp/estimate"]


@pytest.mark.serial
@pytest.mark.parametrize("flags, message", [
    (["--probes", "0"], "error: --probes must be at least 1"),
    (["--model", "cnn", "--layer", "conv7"], "error: cnn has no layer 'conv7': choose one of conv1, conv1/kernel"),
])
def test_density_script_bad_flags_give_one_message_and_no_file(tmp_path, flags, message):
    out = tmp_path / "bad.h5"
    proc = run_mpi(2, [SCRIPT, "--n-samples", "20", "--out", str(out), *flags], timeout=120)
    assert proc.returncode == 2 and proc.stderr.count(message) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
