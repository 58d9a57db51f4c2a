"""Tests of hessmpi.curvature.regularizers: R of the penalty ½·θᵀRθ against TensorFlow's
Hessian of the penalty written here again (tf.nn.conv2d with the stencil, 'SAME' zero
padding), against the module's own stencil function, against the closed-form spectrum of
the zero-padded 9-point Laplacian, and the distributed operator of R against the dense
matrix at any rank count. Assertions are collective.
"""

import numpy as np
import pytest

from hessmpi import runtime

runtime.configure_threads(1)
tf = runtime.import_tensorflow()

from hessmpi.curvature import regularizers as regularize  # noqa: E402
from hessmpi.errors import HessmpiError  # noqa: E402

import cases  # noqa: E402
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


def softmax(image_size=28):
    return cases.build_model({"name": "softmax", "config": {"image_size": image_size}})


def test_laplacian_matrix_is_the_hessian_of_the_penalty_by_autodiff():
    model = softmax(7)
    r = regularize.dense_matrix("laplacian", model)
    h = tf_penalty_hessian(7)
    err = np.abs(r - h).max()
    collective_assert(r.shape == (490, 490) and err < 1e-12 and np.array_equal(r, r.T), f"max |R − ∇²P| = {err:.1e}")


def test_laplacian_matrix_agrees_with_the_stencil_penalty_at_full_size():
    model = softmax()
    rng = np.random.default_rng(0)
    r = regularize.operator("laplacian", model, COMM)
    errors = []
    for _ in range(3):
        theta, v = rng.standard_normal((2, model.n_params))
        rv = r @ v
        errors.append(np.abs(rv - tf_penalty_hvp(theta, v, 28)).max() / np.abs(rv).max())
        quad = 0.5 * theta @ (r @ theta)
        errors.append(abs(quad - regularize.laplacian_penalty(theta)) / quad)
    collective_assert(max(errors) < 1e-12, f"R·v against TF, ½θᵀRθ against the stencil: {max(errors):.1e}")


@pytest.mark.parametrize("kind", ["laplacian", "l2"])
def test_the_operator_of_r_is_the_dense_matrix(kind):
    """Every column of the distributed operator of R, one block product, equals the dense R
    (its rows split over the ranks); R is symmetric."""
    model = softmax(14)
    dense = regularize.dense_matrix(kind, model)
    r = regularize.operator(kind, model, COMM)
    columns = r @ np.eye(model.n_params)
    worst = np.abs(columns - dense).max()
    sym = np.array_equal(dense, dense.T)
    collective_assert(worst == 0.0 and sym and r.n_matvecs == model.n_params,
                      f"{kind}: max column error {worst}, symmetric {sym}, {r.n_matvecs} products")
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
    for kind, spec in (("laplacian", cases.CNN_TINY), ("tv", cases.SOFTMAX_TINY)):
        model = cases.build_model(spec)
        try:
            regularize.dense_matrix(kind, model)
            messages.append(None)
        except HessmpiError as e:
            messages.append(str(e))
    collective_assert(messages[0] and "l2" in messages[0] and messages[1] and "tv" in messages[1], f"{messages}")
