"""The cases of the model, operator and eigen tests, as dicts fed through fixtures,
the few builders that turn a case into a model, data, a point θ and a dense Hessian,
and the fixtures that several test modules share (imported by name where used).

Sample counts include 7 and 11 (divisible by neither 2 nor 3) and 1 and 2 (fewer
samples than ranks), so that the same cases exercise uneven and empty shards at
every rank count the suite runs with (1, 2, 3).
"""

from __future__ import annotations

import numpy as np
import pytest

# ---------------------------------------------------------------- tiny models

SOFTMAX_TINY = {"name": "softmax", "config": {"image_size": 4}, "n_params": 160}
CNN_TINY = {"name": "cnn", "config": {"image_size": 16, "kernel": 3, "filters": (2, 3), "hidden": 4},
            "n_params": 143}

# The models of docs/design.md, with their exact parameter counts.
FULL_MODELS = [
    {"name": "softmax", "config": {}, "n_params": 7_840},
    {"name": "cnn", "config": {}, "n_params": 86_282},
]

# ---------------------------------------------------------------- dense comparisons

# A random point: θ = model.init(seed) + noise·N(0, 1) (nonzero CNN biases, small
# softmax W); random images in [0, 1] and labels drawn from data_seed.
DENSE_CASES = [
    {"id": "softmax-N11", "model": SOFTMAX_TINY, "seed": 0, "noise": 0.1, "data_seed": 10,
     "n_samples": 11},
    {"id": "cnn-N7", "model": CNN_TINY, "seed": 1, "noise": 0.1, "data_seed": 11, "n_samples": 7},
]

# Parallel = serial: N not divisible by 2 or 3, and N below the rank count.
PARALLEL_CASES = [
    {"id": "cnn-N11", "model": CNN_TINY, "seed": 2, "noise": 0.1, "data_seed": 12, "n_samples": 11},
    {"id": "softmax-N2", "model": SOFTMAX_TINY, "seed": 3, "noise": 0.1, "data_seed": 13,
     "n_samples": 2},
    {"id": "softmax-N1", "model": SOFTMAX_TINY, "seed": 4, "noise": 0.1, "data_seed": 14,
     "n_samples": 1},
]

# Micro-batches of 3 split every shard of 11 samples unevenly at 1, 2 and 3 ranks.
MICRO_BATCH_CASE = {"id": "cnn-N11", "model": CNN_TINY, "seed": 5, "noise": 0.1, "data_seed": 15,
                    "n_samples": 11, "micro_batches": (3, 1000)}

# ---------------------------------------------------------------- real digits

# Softmax at W = 0 on the first N bundled digits: H = (1/N) Σᵢ xᵢxᵢᵀ ⊗ (diag(p) − ppᵀ).
CLOSED_FORM_CASE = {"dataset": "mnist-5k", "n_samples": 50, "n_vectors": 5, "seed": 20}

# Every nonzero eigenvalue of that Hessian comes 9 times: nev = 12 is 9·λ₁ then 3·λ₂.
REPEATED_CASE = {"dataset": "mnist-5k", "n_samples": 20, "nev": 12, "copies": (9, 3)}

# ---------------------------------------------------------------- eigen solves

# The softmax's smallest end is a 61-fold zero eigenvalue (rank ≤ 9·11 of 160), which
# costs the multi-pass solve about 1,500 products for nev = 3.
EIGEN_CASES = [dict(DENSE_CASES[0], nev=3), dict(DENSE_CASES[1], nev=5)]
WHICH = ("largest", "smallest", "magnitude")

# Σ_k d_k q_k q_kᵀ with the terms sharded over ranks like samples: known multiplicities.
DEGENERATE_CASE = {"n": 40, "seed": 30, "clusters": ((5.0, 5), (3.0, 3)), "rest": (0.1, 2.0),
                   "nevs": (4, 7)}
# Rank-deficient semi-definite matrices whose wanted end of the spectrum is exact zeros:
# the smallest of a PSD one (every softmax Hessian) and the largest of an NSD one.
SINGULAR_CASES = [
    {"id": "psd-smallest", "n": 60, "rank": 20, "sign": 1.0, "which": "smallest", "seed": 31,
     "nev": 4},
    {"id": "nsd-largest", "n": 60, "rank": 20, "sign": -1.0, "which": "largest", "seed": 31,
     "nev": 4},
]

# ---------------------------------------------------------------- builders

_MODELS: dict = {}  # (spec, dtype) -> the built-in FlatModel (shared: its traced functions too)


def build_model(spec, dtype: str = "float64"):
    """The built-in model of spec (a FlatModel computing in dtype), shared across tests."""
    from hessmpi.models import builtin

    key = (repr(spec), dtype)
    if key not in _MODELS:
        _MODELS[key] = builtin.build(spec["name"], dtype, **spec["config"])
    return _MODELS[key]


def init(model, seed: int = 0) -> np.ndarray:
    """The built-in model's initial θ for seed (models.builtin.init)."""
    from hessmpi.models import builtin

    return builtin.init(model.kind, seed, **model.config)


def point(model, case) -> np.ndarray:
    """θ = init(seed) + noise·N(0, 1), float64."""
    rng = np.random.default_rng(case["seed"])
    return init(model, case["seed"]) + case["noise"] * rng.standard_normal(model.n_params)


def random_data(model, n: int, seed: int):
    """n images (n, s, s, 1) uniform in [0, 1] and n labels in 0..9, the same on every rank."""
    rng = np.random.default_rng(seed)
    s = model.config.get("image_size", 28)
    return rng.uniform(0.0, 1.0, (n, s, s, 1)), rng.integers(0, 10, n).astype(np.int64)


def dense_hessian(model, theta, images, labels) -> np.ndarray:
    """(1/N) ∂²(Σ loss)/∂θ² by nested GradientTapes and tape.jacobian, float64.

    Independent of hessmpi's models and curvature: the model and its loss are the plain
    TensorFlow references of reference_models.
    """
    import reference_models

    from hessmpi import runtime

    tf = runtime.import_tensorflow()
    x, y = tf.constant(images, tf.float64), tf.constant(labels, tf.int64)

    # The Jacobian of the gradient column by column in one tf.function: three times
    # faster than pfor on the tiny CNN.
    @tf.function
    def hessian(th):
        with tf.GradientTape() as outer:
            outer.watch(th)
            with tf.GradientTape() as inner:
                inner.watch(th)
                loss = reference_models.loss_sum(model.kind, model.config, th, x, y)
            grad = inner.gradient(loss, th)
        return outer.jacobian(grad, th, experimental_use_pfor=False)

    return hessian(tf.constant(theta, tf.float64)).numpy() / len(labels)


_DENSE: dict = {}  # what defines a case's Hessian -> the dense Hessian (read-only)


def build(case, dense=True):
    """A case made concrete: model, θ, the full data (same on every rank) and,
    if dense, the dense Hessian H of the mean loss."""
    from types import SimpleNamespace

    model = build_model(case["model"])
    theta = point(model, case)
    images, labels = random_data(model, case["n_samples"], case["data_seed"])
    H = None
    if dense:  # shared by the test modules of one process (the CNN's takes seconds)
        key = repr([case[k] for k in ("model", "seed", "noise", "data_seed", "n_samples")])
        if key not in _DENSE:
            _DENSE[key] = dense_hessian(model, theta, images, labels)
            _DENSE[key].flags.writeable = False
        H = _DENSE[key]
    return SimpleNamespace(case=case, model=model, theta=theta, images=images, labels=labels, H=H)


def problem(built, comm, dtype: str = "float64", micro_batch: int = 1000, hvp_mode: str = "reverse-over-reverse",
            n_samples: int | None = None):
    """The Problem of built's data (the first n_samples) at built.theta, each rank of comm
    holding its shard, computing in dtype."""
    from hessmpi.curvature import Problem
    from hessmpi.data import Data
    from hessmpi.models import resolve

    model = built.model if dtype == built.model.dtype else build_model(built.case["model"], dtype)
    n = n_samples or len(built.labels)
    return Problem(model, resolve(None, model.source), Data(built.images[:n], built.labels[:n]), comm,
                   micro_batch, hvp_mode, built.theta)


def hessian_operator(built, comm, **options):
    """The distributed Hessian of built's data at built.theta over comm; options go to problem()."""
    return problem(built, comm, **options).hessian


def sum_of_terms_operator(weights, vectors, comm):
    """Σ_k w_k q_k q_kᵀ as a DistributedOperator whose terms are sharded over comm's
    ranks like samples (vectors: the q_k as columns)."""
    from hessmpi.curvature import DistributedOperator
    from hessmpi.data import shard_range

    n_terms = len(weights)
    lo, hi = shard_range(n_terms, comm.Get_size(), comm.Get_rank())
    w, Q = np.asarray(weights[lo:hi]), np.asarray(vectors[:, lo:hi])
    return DistributedOperator(lambda v: Q @ (w * (Q.T @ v)), vectors.shape[0], 1.0, comm)


def rel_error(a, b) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius for matrices)."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


# ---------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def degenerate():
    """DEGENERATE_CASE made concrete: H = Σ_k d_k q_k q_kᵀ with d = 5 (five times), 3 (three
    times), then distinct values, as a distributed operator over COMM_WORLD and its shell
    matrix (destroyed at teardown). A test module uses it by importing it:
    `from cases import degenerate  # noqa: F401`. Yields case, d, Q, H (dense), op, mat."""
    from types import SimpleNamespace

    from mpi4py import MPI

    from hessmpi.curvature import petsc

    case = DEGENERATE_CASE
    n = case["n"]
    rng = np.random.default_rng(case["seed"])
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    clusters = [value for value, copies in case["clusters"] for _ in range(copies)]
    d = np.concatenate([clusters, np.linspace(*case["rest"], n - len(clusters))])
    op = sum_of_terms_operator(d, Q, MPI.COMM_WORLD)
    mat = petsc.shell_matrix(op)
    yield SimpleNamespace(case=case, d=d, Q=Q, H=Q @ np.diag(d) @ Q.T, op=op, mat=mat)
    mat.destroy()
