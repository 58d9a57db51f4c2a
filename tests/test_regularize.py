"""Tests of hessmpi.regularize: R of the penalty ½·θᵀRθ against TensorFlow's Hessian of
the penalty written here again (tf.nn.conv2d with the stencil, 'SAME' zero padding),
against the module's own stencil function, against the closed-form spectrum of the
zero-padded 9-point Laplacian, and the PETSc matrix against the dense one at any
rank count. Assertions are collective.
"""

import numpy as np
import pytest

import petsc4py

petsc4py.init()

from hessmpi import runtime  # noqa: E402

runtime.configure_threads(1)
tf = runtime.import_tensorflow()

from hessmpi import models, operator, regularize  # noqa: E402
from hessmpi.errors import HessmpiError  # noqa: E402

from mpi_util import collective_assert, comm  # noqa: E402

COMM = comm()
STENCIL = [[0.5, 1.0, 0.5], [1.0, -6.0, 1.0], [0.5, 1.0, 0.5]]


def tf_penalty(theta, side, classes=10):
    """½·Σₖ‖L·Wₖ‖²: each class's side × side weight image convolved with the stencil, zero padded."""
    images = tf.transpose(tf.reshape(theta, (side, side, classes)), (2, 0, 1))[..., None]  # (classes, s, s, 1)
    kernel = tf.constant(STENCIL, tf.float64)[:, :, None, None]
    return 0.5 * tf.reduce_sum(tf.nn.conv2d(images, kernel, 1, "SAME") ** 2)


def tf_penalty_hessian(side):
    theta = tf.Variable(tf.zeros(side * side * 10, tf.float64))
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            p = tf_penalty(theta, side)
        g = inner.gradient(p, theta)
    return outer.jacobian(g, theta).numpy()


def tf_penalty_hvp(theta, v, side):
    th = tf.constant(theta)
    with tf.autodiff.ForwardAccumulator(th, tf.constant(v)) as acc:
        with tf.GradientTape() as tape:
            tape.watch(th)
            p = tf_penalty(th, side)
        g = tape.gradient(p, th)
    return acc.jvp(g).numpy()


def petsc_full(mat, v):
    """mat·v gathered on every rank, for a full vector v given on every rank."""
    x = mat.createVecRight()
    lo, hi = x.getOwnershipRange()
    x.getArray()[:] = v[lo:hi]
    y = mat.createVecLeft()
    mat.mult(x, y)
    return np.concatenate(COMM.allgather(y.getArray().copy()))


def test_laplacian_matrix_is_the_hessian_of_the_penalty_by_autodiff():
    model = models.get_model("softmax", image_size=7)
    r = regularize.dense_matrix("laplacian", model)
    h = tf_penalty_hessian(7)
    err = np.abs(r - h).max()
    collective_assert(r.shape == (490, 490) and err < 1e-12 and np.array_equal(r, r.T), f"max |R − ∇²P| = {err:.1e}")


def test_laplacian_matrix_agrees_with_the_stencil_penalty_at_full_size():
    model = models.get_model("softmax")
    rng = np.random.default_rng(0)
    counts, offsets = operator.ownership(model.n_params, COMM.Get_size())
    lo = int(offsets[COMM.Get_rank()])
    hi = lo + int(counts[COMM.Get_rank()])
    r = regularize.petsc_matrix("laplacian", model, lo, hi, COMM)
    errors = []
    for _ in range(3):
        theta, v = rng.standard_normal((2, model.n_params))
        rv = petsc_full(r, v)
        errors.append(np.abs(rv - tf_penalty_hvp(theta, v, 28)).max() / np.abs(rv).max())
        quad = 0.5 * theta @ petsc_full(r, theta)
        errors.append(abs(quad - regularize.laplacian_penalty(theta)) / quad)
    r.destroy()
    collective_assert(max(errors) < 1e-12, f"R·v against TF, ½θᵀRθ against the stencil: {max(errors):.1e}")


@pytest.mark.parametrize("kind", ["laplacian", "l2"])
def test_petsc_matrix_rows_match_the_dense_matrix(kind):
    model = models.get_model("softmax", image_size=14)
    dense = regularize.dense_matrix(kind, model)
    counts, offsets = operator.ownership(model.n_params, COMM.Get_size())
    lo = int(offsets[COMM.Get_rank()])
    hi = lo + int(counts[COMM.Get_rank()])
    r = regularize.petsc_matrix(kind, model, lo, hi, COMM)
    own = r.getOwnershipRange() == (lo, hi)
    worst = 0.0
    for i in range(lo, hi):
        cols, vals = r.getRow(i)
        row = np.zeros(model.n_params)
        row[cols] = vals
        worst = max(worst, np.abs(row - dense[i]).max())
    sym = r.isSymmetric(1e-14)
    r.destroy()
    collective_assert(own and worst == 0.0 and sym, f"{kind}: ownership {own}, max row error {worst}, symmetric {sym}")
    if kind == "l2":
        collective_assert(np.array_equal(dense, np.eye(model.n_params)), "L2: R = I")


def test_laplacian_spectrum_is_the_closed_form_and_positive():
    # L·sin-mode = μ·sin-mode, μ(a, b) = −6 + 2cos a + 2cos b + 2cos a cos b, a = kπ/(s+1): L is
    # symmetric with these eigenvalues, none zero, so R = LᵀL ⊗ I is positive definite.
    side = 28
    lap = regularize.laplacian_matrix(side)
    c = np.cos(np.arange(1, side + 1) * np.pi / (side + 1))
    mu = -6 + 2 * c[:, None] + 2 * c[None, :] + 2 * c[:, None] * c[None, :]
    found = np.linalg.eigvalsh(lap.T @ lap)
    expected = np.sort((mu ** 2).ravel())
    ok = np.allclose(found, expected, rtol=0, atol=1e-10 * expected[-1]) and found[0] > 1e-3
    collective_assert(ok, f"smallest eigenvalue of LᵀL {found[0]:.6g}, closed form {expected[0]:.6g}")


def test_bad_requests_are_clear_errors():
    messages = []
    for kind, name in (("laplacian", "cnn"), ("tv", "softmax")):
        model = models.get_model(name, **({"image_size": 16, "kernel": 3, "filters": (2, 3), "hidden": 4}
                                          if name == "cnn" else {"image_size": 4}))
        try:
            regularize.dense_matrix(kind, model)
            messages.append(None)
        except HessmpiError as e:
            messages.append(str(e))
    collective_assert(messages[0] and "l2" in messages[0] and messages[1] and "tv" in messages[1], f"{messages}")
