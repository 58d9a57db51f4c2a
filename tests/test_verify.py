"""hessmpi.solvers.verify: finite differences that cross no kink of ReLU/max-pooling, a wrong
product or gradient caught, "not checkable" with a reason where finite differences cannot
decide. Every test but the script's is collective: it runs as it is under mpirun -n 2 and 3.

The CNN case is the README example scaled down to 100 digits: there the previous verify
(steps 0.5^4 … 0.5^19 whatever the kinks) reported FAIL for the HVP, error 6.4e-1, because
a max-pooling window switches within ε = 0.5^19 of θ along the direction.
"""

import os

import keras
import numpy as np
import pytest

import hessmpi
from hessmpi.solvers import verify as V
from mpi_util import collective_assert, run_mpi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNN_SAMPLES, CNN_SEED = 100, 3  # verify(seed=3) checks the HVP along _direction(n, 4)


def _mlp(rng):
    """A 3-4-2 tanh MLP in float64 with weights from rng (the same on every rank)."""
    model = keras.Sequential([keras.Input((3,), dtype="float64"),
                              keras.layers.Dense(4, activation="tanh", dtype="float64"),
                              keras.layers.Dense(2, dtype="float64")])
    model.set_weights([rng.standard_normal(w.shape) for w in model.get_weights()])
    return model


@pytest.fixture(scope="module")
def cnn():
    return hessmpi.Hessian("cnn", "mnist-5k", n_samples=CNN_SAMPLES).problem


@pytest.fixture(scope="module")
def smooth():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((30, 3)), rng.standard_normal((30, 2))
    return hessmpi.Hessian(_mlp(rng), (x, y), loss="mse").problem


def _summary(checks):
    return "; ".join(f"{c.verdict} {c.name}: {c.error:.2e} {c.detail} {c.unchecked}" for c in checks)


def test_cnn_readme_case_passes_with_kink_free_steps(cnn):
    checks = V.verify(cnn.hessian, seed=CNN_SEED)
    fd = checks[:2]
    collective_assert(all(c.passed for c in checks) and all("nearest kink" in c.detail for c in fd),
                      _summary(checks))


def test_every_step_of_the_plain_ladder_crosses_a_kink_there(cnn):
    """The segments θ ± εd are nested, so a switch within the smallest (ε = 0.5^19) lies in
    all of the previous verify's steps: the case is one where it measured kinks."""
    theta = V.perturbed(cnn.theta, 1e-2, CNN_SEED)
    d = V._direction(cnn.n_params, CNN_SEED + 1)
    switched = V.switched_ops(cnn, theta, d, 0.5 ** 19)
    collective_assert(len(switched) > 0 and all("MaxPool" in s or "LeakyRelu" in s for s in switched),
                      str(switched))


def _as_in_verify(problem, which, seed):
    """verify(seed)'s gradient or HVP check alone (the same point and direction), the problem
    left at its θ."""
    theta = problem.theta.copy()
    try:
        if which == "gradient":
            return V.gradient_check(problem, V.perturbed(theta, 1e-2, seed), seed)
        return V.hvp_check(problem, V.perturbed(theta, 1e-2, seed), seed + 1)
    finally:
        problem.set_params(theta)


def _wrong_hvp(problem, monkeypatch, kind):
    """Make the problem's Hessian product 1.001·H, or H + σI with σ = 1e-3·‖Hd‖ for a unit d."""
    product = problem.hessian.local_product
    if kind == "scaled":
        monkeypatch.setattr(problem.hessian, "local_product", lambda v: 1.001 * product(v))
        return
    sigma = 1e-3 * np.linalg.norm(problem.hessian @ V._direction(problem.n_params, 0))
    extra = problem.n_samples * sigma if problem.comm.Get_rank() == 0 else 0.0  # the operator divides by N
    monkeypatch.setattr(problem.hessian, "local_product", lambda v: product(v) + extra * v)


@pytest.mark.parametrize("model,kind", [("cnn", "scaled"), ("smooth", "scaled"), ("smooth", "shifted")])
def test_a_wrong_hvp_fails(model, kind, request, monkeypatch):
    """The same HVP check passes with the true product (the CNN's in the README case above,
    the smooth model's in test_smooth_model_passes): 1.001·H is wrong by 1e-3 ≫ 1e-6."""
    problem = request.getfixturevalue(model)
    _wrong_hvp(problem, monkeypatch, kind)
    check = _as_in_verify(problem, "hvp", CNN_SEED if model == "cnn" else 0)
    collective_assert(check.failed, _summary([check]))


@pytest.mark.parametrize("model", ["cnn", "smooth"])
def test_a_wrong_gradient_fails(model, request, monkeypatch):
    """The same gradient check passes with the true gradient (in the tests above)."""
    problem = request.getfixturevalue(model)
    loss_grad = problem.curvature.loss_grad

    def wrong():
        value, grad = loss_grad()
        return value, 1.001 * grad

    monkeypatch.setattr(problem.curvature, "loss_grad", wrong)
    check = _as_in_verify(problem, "gradient", CNN_SEED if model == "cnn" else 0)
    collective_assert(check.failed, _summary([check]))


def test_smooth_model_passes(smooth):
    checks = V.verify(smooth.hessian)
    collective_assert(all(c.passed for c in checks) and "no piecewise-linear ops" in checks[1].detail
                      and "16" in checks[1].detail, _summary(checks))


class _ConvNet(keras.Model):
    """A subclassed model with a ReLU convolution and max-pooling."""

    def __init__(self):
        super().__init__(dtype="float64")
        self.conv = keras.layers.Conv1D(3, 3, activation="relu", dtype="float64")
        self.pool = keras.layers.MaxPooling1D(2, dtype="float64")
        self.flat = keras.layers.Flatten(dtype="float64")
        self.out = keras.layers.Dense(3, dtype="float64")

    def call(self, x, training=None):
        return self.out(self.flat(self.pool(self.conv(x))))


def test_subclassed_relu_model_passes_with_its_kinks_located():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((200, 8, 2)), rng.integers(0, 3, 200)
    net = _ConvNet()
    net(x[:1])
    net.set_weights([rng.standard_normal(w.shape) for w in net.get_weights()])
    problem = hessmpi.Hessian(net, (x, y), loss="sparse_categorical_crossentropy", from_logits=True).problem
    checks = V.verify(problem.hessian)
    names = V._Probe.of(problem).names
    collective_assert(all(c.passed for c in checks) and any("Relu" in n for n in names)
                      and any("MaxPool" in n for n in names) and "kink" in checks[1].detail,
                      f"{names}: {_summary(checks)}")


def test_relu_inside_a_loop_is_reported_not_located():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((20, 4, 3)), rng.standard_normal((20, 2))
    model = keras.Sequential([keras.Input((4, 3), dtype="float64"),
                              keras.layers.SimpleRNN(3, activation="relu", dtype="float64"),
                              keras.layers.Dense(2, dtype="float64")])
    model.set_weights([rng.standard_normal(w.shape) for w in model.get_weights()])
    problem = hessmpi.Hessian(model, (x, y), loss="mse").problem
    check = _as_in_verify(problem, "hvp", 0)
    collective_assert(V._Probe.of(problem).hidden == ["Relu"] and not check.failed
                      and "not located: Relu" in check.detail, _summary([check]))


def test_float32_cnn_is_not_checkable_with_a_reason():
    problem = hessmpi.Hessian("cnn", "mnist-5k", n_samples=20, dtype="float32").problem
    checks = V.verify(problem.hessian, seed=CNN_SEED)
    collective_assert(not any(c.failed for c in checks)
                      and all(c.verdict == "not checkable" and "--dtype float64" in c.unchecked for c in checks[:2]),
                      _summary(checks))


@pytest.mark.serial
def test_script_prints_not_checkable_and_exits_0():
    proc = run_mpi(1, [os.path.join(ROOT, "scripts", "verify.py"), "--model", "cnn", "--n-samples", "20",
                       "--dtype", "float32"], timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line[:4] in ("ok  ", "FAIL", "n/a ")]
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert [line[:4] for line in lines] == ["n/a ", "n/a ", "ok  ", "ok  "], proc.stdout
    assert all("not checkable: " in line for line in lines[:2]), proc.stdout
