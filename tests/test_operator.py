"""Tests of the distributed Hessian operator (hessmpi.curvature: local products, operators
and their arithmetic, the PETSc wrapping) against dense Hessians built independently on tiny models.

Runs at any rank count: every rank builds the same reference on the full data and
the operator on its own shard; assertions are collective.
"""

import numpy as np
import pytest
from mpi4py import MPI

from hessmpi import runtime

PETSc = runtime.petsc()
runtime.configure_threads(1)

from hessmpi import data  # noqa: E402
from hessmpi.curvature import HVP_MODES, Identity, MatrixOperator, petsc  # noqa: E402
from hessmpi.curvature.operator import ownership  # noqa: E402
from hessmpi.errors import DataError, HessmpiError  # noqa: E402

import cases  # noqa: E402
from mpi_util import collective_assert, comm  # noqa: E402

COMM = comm()
TOL = 1e-10


def hessian_op(built, comm=COMM, **options):
    return cases.hessian_operator(built, comm, **options)


@pytest.fixture(scope="module", params=cases.DENSE_CASES, ids=lambda c: c["id"])
def tiny(request):
    return cases.build(request.param)


def random_vectors(n, k, seed):
    """k random vectors of length n, the same on every rank."""
    return np.random.default_rng(seed).standard_normal((k, n))


# ---------------------------------------------------------------- against the dense Hessian


def test_dense_reference_is_symmetric(tiny):
    H = tiny.H
    asym = np.linalg.norm(H - H.T) / np.linalg.norm(H)
    collective_assert(H.shape == (tiny.model.n_params,) * 2 and asym <= 1e-12,
                      f"dense Hessian {H.shape}, asymmetry {asym:.2e}")


@pytest.mark.parametrize("hvp_mode", HVP_MODES)
def test_operator_columns_match_dense_hessian(tiny, hvp_mode):
    op = hessian_op(tiny, hvp_mode=hvp_mode)
    n, H = tiny.model.n_params, tiny.H
    cols = np.column_stack([op.apply_full(e) for e in np.eye(n)])
    overall = cases.rel_error(cols, H)
    col_norms = np.linalg.norm(H, axis=0)
    col_errors = np.linalg.norm(cols - H, axis=0)
    floor = 1e-6 * col_norms.max()
    bad = np.flatnonzero(col_errors > TOL * np.maximum(col_norms, floor))
    collective_assert(overall <= TOL and bad.size == 0 and op.n_matvecs == n,
                      f"{hvp_mode}: ‖H_op − H‖/‖H‖ = {overall:.2e}, {bad.size} bad columns "
                      f"(first {bad[:5].tolist()}), {op.n_matvecs} matvecs for {n} columns")


def test_block_products_match_dense_hessian(tiny):
    # A block of 5 vectors in one call: the columns of H·X, counted as 5 products.
    op = hessian_op(tiny)
    n = tiny.model.n_params
    x = random_vectors(n, 5, seed=3).T
    y = op.apply_block(x[op.lo:op.hi])
    full = np.concatenate(COMM.allgather(y))
    error = cases.rel_error(full, tiny.H @ x)
    collective_assert(y.shape == (op.n_local, 5) and error <= TOL and op.n_matvecs == 5,
                      f"shape {y.shape}, ‖HX_op − HX‖/‖HX‖ = {error:.2e}, {op.n_matvecs} matvecs")


def test_shell_matrix_matches_dense_hessian(tiny):
    op = hessian_op(tiny)
    mat = petsc.shell_matrix(op)
    try:
        n = tiny.model.n_params
        layout_ok = (mat.getSize() == (n, n) and mat.getOwnershipRange() == (op.lo, op.hi))
        errors = []
        for v in random_vectors(n, 3, seed=1):
            x = petsc.vec_from_full(mat, v)
            y = mat.createVecLeft()
            mat.mult(x, y)
            errors.append(cases.rel_error(petsc.vec_to_full(y, COMM), tiny.H @ v))
            x.destroy()
            y.destroy()
        collective_assert(layout_ok and max(errors) <= TOL and op.n_matvecs == 3,
                          f"layout ok: {layout_ok}, errors {errors}, {op.n_matvecs} matvecs")
    finally:
        mat.destroy()


def test_operator_is_symmetric(tiny):
    op = hessian_op(tiny)
    n = tiny.model.n_params
    scale = np.linalg.norm(tiny.H, 2)
    gaps = []
    for x, y in random_vectors(n, 6, seed=2).reshape(3, 2, n):
        gap = abs(y @ op.apply_full(x) - x @ op.apply_full(y))
        gaps.append(gap / (np.linalg.norm(x) * np.linalg.norm(y) * scale))
    collective_assert(max(gaps) <= 1e-12, f"|yᵀHx − xᵀHy| / (‖x‖‖y‖‖H‖) = {gaps}")


def test_float32_agrees_with_float64(tiny):
    op32 = hessian_op(tiny, dtype="float32")
    errors = [cases.rel_error(op32.apply_full(v), tiny.H @ v)
              for v in random_vectors(tiny.model.n_params, 3, seed=3)]
    collective_assert(max(errors) <= 1e-5, f"float32 relative errors {errors}")


# ---------------------------------------------------------------- softmax at W = 0, real digits


@pytest.fixture(scope="module")
def digits():
    try:
        return data.load(cases.CLOSED_FORM_CASE["dataset"])
    except DataError as e:  # the same on every rank
        pytest.skip(str(e))


def test_softmax_at_zero_matches_closed_form(digits):
    import hessmpi

    case = cases.CLOSED_FORM_CASE
    N = case["n_samples"]
    X = digits.train_images[:N].reshape(N, -1) / 255.0  # all N samples, (N, 784)
    op = hessmpi.Hessian("softmax", digits.split("train", N), comm=COMM)
    model = op.problem.model
    assert not op.problem.theta.any()  # at W = 0

    p = np.full(10, 0.1)
    A = np.diag(p) - np.outer(p, p)
    # H = (1/N) Σᵢ xᵢxᵢᵀ ⊗ A with θ index pixel·10 + class: H·vec(V) = vec((1/N) XᵀX V A).
    errors = []
    for v in random_vectors(model.n_params, case["n_vectors"], case["seed"]):
        V = v.reshape(784, 10)
        expected = (X.T @ (X @ V) @ A / N).ravel()
        errors.append(cases.rel_error(op.apply_full(v), expected))
    collective_assert(max(errors) <= TOL, f"relative errors against the closed form {errors}")


# ---------------------------------------------------------------- invariances


def test_micro_batching_does_not_change_the_product():
    case = cases.MICRO_BATCH_CASE
    built = cases.build(case, dense=False)
    small, large = (hessian_op(built, micro_batch=m) for m in case["micro_batches"])
    errors = [cases.rel_error(small.apply_full(v), large.apply_full(v))
              for v in random_vectors(built.model.n_params, 3, seed=4)]
    collective_assert(max(errors) <= 1e-12, f"micro-batch 3 vs 1000: relative errors {errors}")


@pytest.mark.parametrize("case", cases.PARALLEL_CASES, ids=lambda c: c["id"])
def test_parallel_equals_serial(case):
    """This rank count's product equals a one-rank operator's over all the data,
    also when N does not divide evenly and when some ranks hold no sample."""
    built = cases.build(case, dense=False)
    parallel = hessian_op(built, COMM)
    serial = hessian_op(built, MPI.COMM_SELF)
    errors, replicated = [], True
    for v in random_vectors(built.model.n_params, 3, seed=5):
        y = parallel.apply_full(v)
        errors.append(cases.rel_error(y, serial.apply_full(v)))
        replicated &= all(np.array_equal(y, other) for other in COMM.allgather(y))
    collective_assert(max(errors) <= 1e-12 and replicated,
                      f"N={case['n_samples']} on {COMM.size} ranks: relative errors {errors}, "
                      f"identical on every rank: {replicated}")


def test_operator_counts_one_matvec_per_product():
    built = cases.build(cases.DENSE_CASES[0], dense=False)
    op = hessian_op(built, micro_batch=2)  # several micro-batches per product
    seen = []
    op.on_matvec = lambda o: seen.append(o.n_matvecs)
    n = built.model.n_params
    v = random_vectors(n, 1, seed=6)[0]
    counts = [op.n_matvecs]
    op.apply(v[op.lo:op.hi])
    counts.append(op.n_matvecs)
    op.apply_full(v)
    counts.append(op.n_matvecs)
    mat = petsc.shell_matrix(op)
    try:
        x = petsc.vec_from_full(mat, v)
        y = mat.createVecLeft()
        mat.mult(x, y)
        mat.mult(y, x)
        counts.append(op.n_matvecs)
    finally:
        mat.destroy()
    collective_assert(counts == [0, 1, 2, 4] and seen == [1, 2, 3, 4],
                      f"n_matvecs after 0, 1, 2, 4 products: {counts}; callback saw {seen}")


@pytest.mark.parametrize("n", [1, 2, 7, 143, 7_840, 86_282])
def test_ownership_matches_petsc_layout(n):
    counts, offsets = ownership(n, COMM.size)
    vec = PETSc.Vec().createMPI(n, comm=COMM)
    try:
        petsc_range = vec.getOwnershipRange()
    finally:
        vec.destroy()
    ours = (int(offsets[COMM.rank]), int(offsets[COMM.rank] + counts[COMM.rank]))
    collective_assert(ours == petsc_range and counts.sum() == n and len(counts) == COMM.size,
                      f"n={n}: ownership gives {ours}, PETSc {petsc_range}, counts {counts}")


def test_products_are_traced_once_whatever_the_instances_and_batch_sizes():
    # Shard sizes, micro-batch sizes and new LocalCurvatures of one model (a rank curve makes
    # one per batch size, training one per mini-batch) must reuse the traced functions.
    from hessmpi.curvature import LocalCurvature
    from hessmpi.data import Data, LocalShard
    from hessmpi.models import builtin, resolve

    model = builtin.build("softmax", image_size=4)  # a model of its own: no functions traced yet
    loss = resolve(None, model.source)
    traces, outputs = [], model.outputs

    def counted_outputs(theta, images):  # runs in Python only while a function is traced
        traces.append(1)
        return outputs(theta, images)

    model.outputs = counted_outputs
    rng = np.random.default_rng(0)
    v = rng.standard_normal(model.n_params)
    counts = []
    for n, micro_batch in ((7, 3), (5, 5), (11, 4), (1, 1)):
        samples = Data(rng.random((n, 4, 4, 1)), rng.integers(0, 10, n))
        c = LocalCurvature(model, loss, LocalShard(samples, 0, n, micro_batch, "float64"))
        c.set_params(rng.standard_normal(model.n_params))
        c.hvp(v)
        c.ggn(v)
        c.loss_grad()
        counts.append((c.tracing_count(), c.tracing_count("ggn")))
    collective_assert(counts == [(1, 1)] * 4 and len(traces) == 3,
                      f"(HVP, GGN) tracing counts per instance: {counts}; {len(traces)} traces in all "
                      f"(HVP, GGN, gradient: 3 expected)")


# ---------------------------------------------------------------- arithmetic


def test_sums_of_operators_match_the_dense_sum(tiny):
    """H + γR + σI (R a fixed sparse matrix, here a random symmetric one), −H and H/2 as one
    operator each: their products equal the dense combination, a product of the sum costs
    one of H, and the sum counts its own products and H's."""
    import scipy.sparse

    op = hessian_op(tiny)
    n = tiny.model.n_params
    R = scipy.sparse.random(n, n, density=0.05, random_state=9)
    R = (R + R.T).tocsr()
    total = op + 0.3 * MatrixOperator(R, COMM) + 0.7 * Identity(n, COMM)
    others = [(-op, -tiny.H), (op / 2, tiny.H / 2), (op - op, 0 * tiny.H)]
    x = random_vectors(n, 3, seed=8).T
    errors = [cases.rel_error(total @ x, (tiny.H + 0.3 * R.toarray() + 0.7 * np.eye(n)) @ x)]
    errors += [float(np.linalg.norm(a @ x[:, 0] - b @ x[:, 0])) / np.linalg.norm(tiny.H @ x[:, 0])
               for a, b in others]
    collective_assert(max(errors) <= TOL and total.n_matvecs == 3 and op.n_matvecs >= 3 and len(total.terms) == 3,
                      f"relative errors {errors}; sum products {total.n_matvecs}, H products {op.n_matvecs}")


def test_a_block_of_a_sum_is_the_dense_block(tiny):
    op = hessian_op(tiny)
    n = tiny.model.n_params
    block = slice(n // 3, n // 3 + 17)
    shifted = (op + 2.0 * Identity(n, COMM)).block(block.start, block.stop)
    dense = (tiny.H + 2.0 * np.eye(n))[block, block]
    x = random_vectors(shifted.n, 2, seed=10).T
    error = cases.rel_error(shifted @ x, dense @ x)
    collective_assert(error <= TOL and shifted.n == 17, f"block of H + 2I: relative error {error:.2e}")


def test_operators_of_different_sizes_do_not_add(tiny):
    op = hessian_op(tiny)
    with pytest.raises(HessmpiError, match="cannot add operators of sizes"):
        op + Identity(op.n + 1, COMM)
    with pytest.raises(HessmpiError, match="expected a vector of"):
        op @ np.zeros(op.n + 1)


def test_to_scipy_on_one_rank_and_to_petsc(tiny):
    """H.to_scipy() (one rank) and H.to_petsc() multiply like the dense Hessian."""
    op = hessian_op(tiny)
    v = random_vectors(op.n, 1, seed=11)[0]
    mat = op.to_petsc()
    try:
        x = petsc.vec_from_full(mat, v)
        y = mat.createVecLeft()
        mat.mult(x, y)
        petsc_error = cases.rel_error(petsc.vec_to_full(y, COMM), tiny.H @ v)
    finally:
        mat.destroy()
    if COMM.size == 1:
        scipy_error = cases.rel_error(op.to_scipy() @ v, tiny.H @ v)
    else:
        with pytest.raises(HessmpiError, match="to_scipy"):
            op.to_scipy()
        scipy_error = 0.0
    collective_assert(max(petsc_error, scipy_error) <= TOL, f"petsc {petsc_error:.2e}, scipy {scipy_error:.2e}")
