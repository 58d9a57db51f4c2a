"""Tests of the training methods (hessmpi.optim: newton, lrsfn, first_order) and the regularizers
they use, against dense references built independently on tiny models, numpy and scipy.

Runs at any rank count: every rank builds the same reference on the full data and the
method on its own shard; assertions are collective.
"""

import numpy as np
import pytest

from hessmpi import runtime

runtime.init_petsc()
runtime.configure_threads(1)
tf = runtime.import_tensorflow()

import hessmpi  # noqa: E402
from hessmpi.curvature import regularizers as regularize  # noqa: E402
from hessmpi.optim import training  # noqa: E402
from hessmpi.optim.first_order import KerasOptimizer  # noqa: E402
from hessmpi.optim.lrsfn import LowRankSaddleFreeNewton  # noqa: E402
from hessmpi.optim.newton import NewtonCG, reason_name  # noqa: E402

import cases  # noqa: E402
import reference_models  # noqa: E402
from mpi_util import collective_assert, comm  # noqa: E402

COMM = comm()
SOFTMAX_CASE = {"id": "softmax-N13", "model": cases.SOFTMAX_TINY, "seed": 40, "noise": 0.3, "data_seed": 41,
                "n_samples": 13}
CNN_CASE = {"id": "cnn-N11", "model": cases.CNN_TINY, "seed": 42, "noise": 0.3, "data_seed": 43,
            "n_samples": 11}


def array_problem(built, comm=COMM):
    """The Problem of a case's arrays (tiny models, whose images are not 28×28), each rank of
    comm holding its block."""
    return cases.problem(built, comm)


# ---------------------------------------------------------------- independent references


def tf_penalty(kind, theta, side):
    """½θᵀRθ written in TensorFlow: ½‖θ‖², or ½Σₖ‖conv(Wₖ, stencil)‖² with zero padding."""
    if kind == "l2":
        return 0.5 * tf.reduce_sum(theta ** 2)
    images = tf.transpose(tf.reshape(theta, (side, side, 10)), (2, 0, 1))[..., None]
    kernel = tf.constant(regularize.STENCIL, theta.dtype)[:, :, None, None]
    return 0.5 * tf.reduce_sum(tf.nn.conv2d(images, kernel, 1, "SAME") ** 2)


def penalty_hessian(kind, model):
    """∂²(½θᵀRθ)/∂θ² by nested GradientTapes (at a random θ; it is constant)."""
    th = tf.constant(np.random.default_rng(0).standard_normal(model.n_params))
    with tf.GradientTape() as outer:
        outer.watch(th)
        with tf.GradientTape() as inner:
            inner.watch(th)
            value = tf_penalty(kind, th, model.config.get("image_size", 28))
        grad = inner.gradient(value, th)
    return outer.jacobian(grad, th).numpy()


def dense_objective(model, theta, images, labels, gamma, R, hessian=True):
    """(F, ∇F, ∇²F or None) of mean loss + γ/2·θᵀRθ by TensorFlow autodiff, independent of hessmpi."""
    th = tf.constant(theta)
    x, y = tf.constant(images), tf.constant(labels)
    with tf.GradientTape() as tape:
        tape.watch(th)
        loss = reference_models.loss_sum(model.kind, model.config, th, x, y) / len(labels)
    g = tape.gradient(loss, th).numpy() + gamma * R @ theta
    H = cases.dense_hessian(model, theta, images, labels) + gamma * R if hessian else None
    return float(loss) + 0.5 * gamma * theta @ R @ theta, g, H


_DATA_HESSIANS = {}


def setup(case, kind="l2", gamma=0.0, hessian=True):
    """The case built, its Problem and Objective, and the dense F, ∇F, ∇²F (if hessian)
    at θ (the data Hessian is computed once per case: the CNN's costs seconds)."""
    built = cases.build(case, dense=False)
    problem = array_problem(built)
    objective = training.Objective(problem, kind, gamma, training.Cost())
    R = regularize.dense_matrix(kind, built.model)
    F, g, _ = dense_objective(built.model, built.theta, built.images, built.labels, gamma, R, hessian=False)
    return built, problem, objective, F, g, (data_hessian(case) + gamma * R if hessian else None)


def data_hessian(case):
    """The dense Hessian of the case's mean loss at its θ, computed once per case."""
    if case["id"] not in _DATA_HESSIANS:
        built = cases.build(case, dense=False)
        _DATA_HESSIANS[case["id"]] = cases.dense_hessian(built.model, built.theta, built.images, built.labels)
    return _DATA_HESSIANS[case["id"]]


def truncated_cg(H, b, tol, max_it):
    """Textbook CG on Hx = b from x = 0 that stops before a direction of nonpositive curvature
    (Nocedal & Wright, Algorithm 7.1): the reference for the negative-curvature safeguard."""
    x, r = np.zeros_like(b), b.copy()
    p = r.copy()
    for it in range(max_it):
        Hp = H @ p
        kappa = p @ Hp
        if kappa <= 0:
            return x, it, "negative curvature"
        alpha = (r @ r) / kappa
        x = x + alpha * p
        r_new = r - alpha * Hp
        if np.linalg.norm(r_new) <= tol * np.linalg.norm(b):
            return x, it + 1, "converged"
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    return x, max_it, "max_it"


# ---------------------------------------------------------------- regularizers


@pytest.mark.parametrize("kind", regularize.REGULARIZERS)
def test_regularizer_matrix_is_the_autodiff_hessian_of_its_penalty(kind):
    model = cases.build_model(cases.SOFTMAX_TINY)
    theta = np.random.default_rng(1).standard_normal(model.n_params)
    value_ok = True
    if kind == "laplacian":  # the TF penalty is the lead's numpy penalty
        value = float(tf_penalty(kind, tf.constant(theta), 4))
        value_ok = abs(value - regularize.laplacian_penalty(theta, side=4)) <= 1e-12 * abs(value)
    reference = penalty_hessian(kind, model)
    columns = regularize.operator(kind, model, COMM) @ np.eye(model.n_params)
    err = cases.rel_error(columns, reference)
    dense_err = cases.rel_error(regularize.dense_matrix(kind, model), reference)
    collective_assert(value_ok and err <= 1e-13 and dense_err <= 1e-13,
                      f"{kind}: penalty value ok {value_ok}, ‖R_op − ∇²‖/‖∇²‖ = {err:.1e}, dense {dense_err:.1e}")


def test_full_size_laplacian_product_is_the_autodiff_hvp():
    """R·v on the 28×28 softmax model against the TF gradient of v ↦ ½vᵀRv (= Rv)."""
    model = cases.build_model(cases.FULL_MODELS[0])
    v = np.random.default_rng(2).standard_normal(model.n_params)
    th = tf.constant(v)
    with tf.GradientTape() as tape:
        tape.watch(th)
        value = tf_penalty("laplacian", th, 28)
    reference = tape.gradient(value, th).numpy()
    problem = type("P", (), {})()  # the objective's penalty needs the model and the ranks only
    problem.model, problem.comm = model, COMM
    objective = training.Objective(problem, "laplacian", 1.0, training.Cost())
    pen, rv = objective.penalty(v)
    collective_assert(cases.rel_error(rv, reference) <= 1e-13 and abs(pen - float(value)) <= 1e-12 * pen,
                      f"‖Rv − ∇penalty‖ rel {cases.rel_error(rv, reference):.1e}; penalty {pen} vs {float(value)}")


# ---------------------------------------------------------------- Newton-CG


@pytest.mark.parametrize("case,kind", [(SOFTMAX_CASE, "l2"), (SOFTMAX_CASE, "laplacian"), (CNN_CASE, "l2")],
                         ids=["softmax-l2", "softmax-laplacian", "cnn-l2"])  # the Laplacian is for softmax only
def test_newton_step_equals_dense_solve(case, kind):
    # γ making H + γR positive definite, so that the Newton step is defined.
    gamma = max(0.05, 0.05 - np.linalg.eigvalsh(data_hessian(case))[0]) if kind == "l2" else 0.05
    built, problem, objective, F, g, H = setup(case, kind, gamma)
    R = regularize.dense_matrix(kind, built.model)
    pd = np.linalg.eigvalsh(H)[0] > 0
    newton = NewtonCG(objective, eta_max=1e-13)
    theta_new, info = newton.step(built.theta, 0)
    p = np.linalg.solve(H, -g)
    d = (theta_new - built.theta) / info["step_size"]
    # The line search: the first α in 1, ½, … meeting Armijo on the dense objective.
    alpha = 1.0
    while dense_objective(built.model, built.theta + alpha * p, built.images, built.labels, gamma, R,
                          hessian=False)[0] > F + 1e-4 * alpha * g @ p:
        alpha /= 2
    collective_assert(pd and cases.rel_error(d, p) <= 1e-9 and info["step_size"] == alpha
                      and reason_name(info["ksp_reason"]) == "CONVERGED_RTOL" and not info["fallback"],
                      f"{kind}: H+γR pd {pd}; ‖p − p_dense‖/‖p_dense‖ = {cases.rel_error(d, p):.1e}; "
                      f"α {info['step_size']} vs {alpha}; {reason_name(info['ksp_reason'])}")
    newton.destroy()


def dense_ggn(model, theta, images):
    """(1/N) Σᵢ Jᵢᵀ(diag(pᵢ) − pᵢpᵢᵀ)Jᵢ with Jᵢ the Jacobian of sample i's logits (TF, dense)."""
    x = tf.constant(images)

    @tf.function
    def jacobian(th):
        with tf.GradientTape() as tape:
            tape.watch(th)
            z = reference_models.logits(model.kind, model.config, th, x)
        return z, tape.jacobian(z, th, experimental_use_pfor=False)

    z, J = (t.numpy() for t in jacobian(tf.constant(theta)))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return sum(J[i].T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ J[i] for i in range(len(z))) / len(z)


def test_gauss_newton_and_subsampled_directions_equal_dense_solves():
    """curvature='ggn' solves (G + γI)p = −g on the CNN; a Hessian mini-batch solves
    (H_b + γI)p = −g with H_b the dense Hessian of the iteration's seeded batch (softmax)."""
    gamma = 0.05
    built, problem, objective, F, g, _ = setup(CNN_CASE, "l2", gamma, hessian=False)
    G = dense_ggn(built.model, built.theta, built.images) + gamma * np.eye(built.model.n_params)
    newton = NewtonCG(objective, eta_max=1e-13, curvature="ggn")
    d, info = newton.direction(built.theta, g)
    newton.destroy()
    ggn_err = cases.rel_error(d, np.linalg.solve(G, -g))

    built, problem, objective, F, g, _ = setup(SOFTMAX_CASE, "l2", gamma, hessian=False)
    n = len(built.labels)
    batches = training.LocalBatches(problem)
    newton = NewtonCG(objective, eta_max=1e-13, batches=batches, hessian_batch=5, seed=9)
    d, info_b = newton.direction(built.theta, g, iteration=3)
    newton.destroy()
    idx = training.batch_indices(9, n, 5, 3, stream=2)
    H_b = cases.dense_hessian(built.model, built.theta, built.images[idx], built.labels[idx]) + gamma * np.eye(160)
    batch_err = cases.rel_error(d, np.linalg.solve(H_b, -g))
    sweeps = objective.cost.sweeps
    collective_assert(ggn_err <= 1e-9 and batch_err <= 1e-9 and abs(sweeps - 2 * 5 / n * info_b["hvps"]) < 1e-12,
                      f"GGN direction rel error {ggn_err:.1e}; sub-sampled {batch_err:.1e}; "
                      f"sweeps {sweeps} for {info_b['hvps']} batch products")


@pytest.mark.parametrize("damping", [0.0, 0.3], ids=["undamped", "damped"])
def test_subsampled_newton_step_equals_dense_solve(damping):
    """A sub-sampled Newton step θ + α·p: p solves (H_S + γI + σI)p = −∇F with H_S the dense
    Hessian of the iteration's seeded subsample S and ∇F the gradient over all samples,
    α is the first of 1, ½, … meeting Armijo on the full objective, and the cost is
    2|S|/N sweeps per product plus one per line-search trial."""
    gamma, m, seed, iteration = 0.05, 5, 9, 2
    built, problem, objective, F, g, _ = setup(SOFTMAX_CASE, "l2", gamma, hessian=False)
    n, R = len(built.labels), np.eye(160)
    batches = training.LocalBatches(problem)
    newton = NewtonCG(objective, eta_max=1e-13, batches=batches, hessian_batch=m, seed=seed, damping=damping)
    theta_new, info = newton.step(built.theta, iteration)
    newton.destroy()
    idx = training.batch_indices(seed, n, m, iteration, stream=2)
    H_S = cases.dense_hessian(built.model, built.theta, built.images[idx], built.labels[idx])
    p = np.linalg.solve(H_S + (gamma + damping) * R, -g)
    alpha, trials = 1.0, 1
    while dense_objective(built.model, built.theta + alpha * p, built.images, built.labels, gamma, R,
                          hessian=False)[0] > F + 1e-4 * alpha * g @ p:
        alpha, trials = alpha / 2, trials + 1
    err = cases.rel_error(theta_new - built.theta, alpha * p)
    sweeps = objective.cost.sweeps  # iteration > 0: ∇F at θ was paid by the previous line search
    expected_sweeps = 2 * m / n * info["hvps"] + trials
    collective_assert(err <= 1e-9 and info["step_size"] == alpha and len(set(idx)) == m
                      and abs(sweeps - expected_sweeps) < 1e-12,
                      f"σ {damping}: ‖Δθ − α·p_dense‖ rel {err:.1e}; α {info['step_size']} vs {alpha}; "
                      f"sweeps {sweeps} vs {expected_sweeps} ({info['hvps']} products, {trials} trials)")


def histories_here_and_on_one_rank(make_newton, iterations):
    """(the case, [(θ, history, stop reason)]) of `iterations` Newton iterations on the
    small softmax case, on this run's ranks and then on COMM_SELF; make_newton(objective,
    batches) builds the method."""
    from mpi4py import MPI

    built = cases.build(SOFTMAX_CASE, dense=False)
    runs = []
    for comm_ in (COMM, MPI.COMM_SELF):
        problem = array_problem(built, comm_)
        objective = training.Objective(problem, "l2", 0.05, training.Cost())
        batches = training.LocalBatches(problem)
        newton = make_newton(objective, batches)
        history = training.History()
        theta, why = training.run(newton, objective, built.theta, history, iterations)
        newton.destroy()
        runs.append((theta, history, why))
    return built, runs


def test_subsampled_newton_history_is_the_same_on_every_rank_count():
    """Three sub-sampled Newton iterations on this run's ranks and on one rank (COMM_SELF)
    give the same history: the subsample is drawn globally and each rank uses its share."""
    built, runs = histories_here_and_on_one_rank(
        lambda objective, batches: NewtonCG(objective, batches=batches, hessian_batch=6, seed=4, damping=0.01), 3)
    (theta_p, hist_p, why_p), (theta_1, hist_1, why_1) = runs
    exact = all(hist_p.rows[f] == hist_1.rows[f] for f in ("iteration", "ksp_iterations", "hvps", "sweeps",
                                                             "step_size"))
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(hist_p.rows["loss"], hist_1.rows["loss"]))
    theta_err = cases.rel_error(theta_p - built.theta, theta_1 - built.theta)
    collective_assert(why_p == why_1 == "iterations" and exact and loss_err <= 1e-13 and theta_err <= 1e-10
                      and hist_1.rows["loss"][-1] < hist_1.rows["loss"][0],
                      f"{COMM.Get_size()} ranks vs 1: stop {why_p}/{why_1}; counts equal {exact} "
                      f"(KSP its {hist_p.rows['ksp_iterations']} vs {hist_1.rows['ksp_iterations']}); "
                      f"loss rel diff {loss_err:.1e}; θ rel diff {theta_err:.1e}")


@pytest.mark.parametrize("hessian_batch", [None, 5], ids=["prefix-hessian", "subsampled"])
def test_growing_sample_newton_step_equals_dense_solve(hessian_batch):
    """Iteration k of dynamic sample size Newton (--grow-from 4, factor 2: n = 4, 8, 13) uses
    only the first n_k = 8 samples: p solves (H_S + γI + σI)p = −∇F_8, S the first 8 samples
    (or the iteration's seeded subsample of them), α is the first of 1, ½, … meeting Armijo
    on F_8, and the cost is (8 − 4)/N for ∇F_8 (the first 4 were paid by the line search
    of iteration k − 1), 8/N per trial and 2|S|/N per product."""
    gamma, damping, seed, iteration, n_k = 0.05, 0.02, 3, 1, 8
    built, problem, objective, _, _, _ = setup(SOFTMAX_CASE, "l2", gamma, hessian=False)
    n, R = len(built.labels), np.eye(160)
    batches = training.LocalBatches(problem)
    newton = NewtonCG(objective, eta_max=1e-13, batches=batches, hessian_batch=hessian_batch, seed=seed,
                      damping=damping, grow_from=4, grow_factor=2.0)
    sizes = [newton.sample_size(k) for k in range(4)]
    theta_new, info = newton.step(built.theta, iteration)
    newton.destroy()
    X, y = built.images[:n_k], built.labels[:n_k]
    F, g, _ = dense_objective(built.model, built.theta, X, y, gamma, R, hessian=False)
    idx = (np.arange(n_k) if hessian_batch is None
           else training.batch_indices(seed, n_k, hessian_batch, iteration, stream=2))
    H_S = cases.dense_hessian(built.model, built.theta, X[idx], y[idx])
    p = np.linalg.solve(H_S + (gamma + damping) * R, -g)
    alpha, trials = 1.0, 1
    while dense_objective(built.model, built.theta + alpha * p, X, y, gamma, R, hessian=False)[0] \
            > F + 1e-4 * alpha * g @ p:
        alpha, trials = alpha / 2, trials + 1
    err = cases.rel_error(theta_new - built.theta, alpha * p)
    expected_sweeps = (n_k - 4) / n + trials * n_k / n + 2 * len(idx) / n * info["hvps"]
    sweeps = objective.cost.sweeps
    collective_assert(sizes == [4, 8, 13, 13] and err <= 1e-9 and info["step_size"] == alpha
                      and np.all(idx < n_k) and abs(sweeps - expected_sweeps) < 1e-12,
                      f"sizes {sizes}; ‖Δθ − α·p_dense‖ rel {err:.1e}; α {info['step_size']} vs {alpha}; "
                      f"sweeps {sweeps} vs {expected_sweeps} ({info['hvps']} products, {trials} trials)")


def test_growing_sample_history_is_the_same_on_every_rank_count():
    """Four iterations of dynamic sample size Newton (n = 3, 6, 12, 13: the first of them on
    samples one rank owns alone at 2 ranks) on this run's ranks and on one rank give the
    same history, and they reach the full-data objective's decrease."""
    built, runs = histories_here_and_on_one_rank(
        lambda objective, batches: NewtonCG(objective, batches=batches, damping=0.01, grow_from=3, grow_factor=2.0), 4)
    (theta_p, hist_p, why_p), (theta_1, hist_1, why_1) = runs
    exact = all(hist_p.rows[f] == hist_1.rows[f] for f in ("iteration", "ksp_iterations", "hvps", "step_size"))
    sweeps_err = max(abs(a - b) for a, b in zip(hist_p.rows["sweeps"], hist_1.rows["sweeps"]))
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(hist_p.rows["loss"], hist_1.rows["loss"]))
    theta_err = cases.rel_error(theta_p - built.theta, theta_1 - built.theta)
    collective_assert(why_p == why_1 == "iterations" and exact and sweeps_err < 1e-12 and loss_err <= 1e-12
                      and theta_err <= 1e-10 and hist_1.rows["loss"][-1] < hist_1.rows["loss"][0],
                      f"{COMM.Get_size()} ranks vs 1: stop {why_p}/{why_1}; counts equal {exact} "
                      f"(KSP its {hist_p.rows['ksp_iterations']} vs {hist_1.rows['ksp_iterations']}); "
                      f"sweeps diff {sweeps_err:.1e}; loss rel diff {loss_err:.1e}; θ rel diff {theta_err:.1e}")


def test_growing_sample_refuses_bad_settings():
    built = cases.build(SOFTMAX_CASE, dense=False)
    problem = array_problem(built)
    objective = training.Objective(problem, "l2", 0.1, training.Cost())
    batches = training.LocalBatches(problem)
    errors = []
    for kwargs, message in (({"grow_from": 0}, "--grow-from must be between 1 and the 13 training samples"),
                            ({"grow_from": 14}, "--grow-from must be between 1 and the 13 training samples"),
                            ({"grow_from": 4, "grow_factor": 1.0}, "--grow-factor must be a finite number > 1"),
                            ({"grow_from": 4, "grow_factor": float("inf")}, "--grow-factor must be a finite")):
        try:
            NewtonCG(objective, batches=batches, **kwargs).destroy()
            errors.append(f"{kwargs}: accepted")
        except training.HessmpiError as e:
            if message not in str(e):
                errors.append(f"{kwargs}: {e}")
    collective_assert(not errors, "; ".join(errors))


@pytest.mark.parametrize("kind", regularize.REGULARIZERS)
def test_kronecker_preconditioner_is_the_inverse_of_its_dense_matrix(kind):
    """P⁻¹ applied by PETSc equals the dense inverse of S ⊗ Ā + γR + σI (S the pixel second
    moments of all images, Ā the mean softmax Hessian of the subsample); at θ = 0, where all
    pᵢ are equal, P is the Hessian of F itself, and the preconditioned KSP solves the
    Newton system in one iteration."""
    gamma, sigma, m, seed = 0.05, 0.02, 6, 3
    built, problem, objective, F, g, _ = setup(SOFTMAX_CASE, kind, gamma, hessian=False)
    n, model = len(built.labels), built.model
    batches = training.LocalBatches(problem)
    newton = NewtonCG(objective, batches=batches, hessian_batch=m, seed=seed, damping=sigma,
                      preconditioner="kronecker")
    newton.data_curvature(built.theta, 0)
    X = built.images.reshape(n, -1)
    idx = training.batch_indices(seed, n, m, 0, stream=2)
    Z = X[idx] @ built.theta.reshape(-1, 10)
    p = np.exp(Z - Z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    A = sum(np.diag(q) - np.outer(q, q) for q in p) / m
    R = regularize.dense_matrix(kind, model)
    P = np.kron(X.T @ X / n, A) + gamma * R + sigma * np.eye(160)
    v = np.random.default_rng(5).standard_normal(160)
    x, y = newton.mat.createVecs()
    x.getArray()[:] = v[newton.op.lo:newton.op.hi]
    newton.ksp.getPC().apply(x, y)
    err = cases.rel_error(newton.op.gather(y.getArray(readonly=True)).copy(), np.linalg.solve(P, v))
    cost = objective.cost.sweeps  # S once (1 sweep) and the subsample's probabilities (m/n)
    newton.destroy()

    zero = np.zeros(160)
    F0, g0, H0 = dense_objective(model, zero, built.images, built.labels, gamma, R)
    newton = NewtonCG(objective, eta_max=1e-10, batches=batches, preconditioner="kronecker")
    d, info = newton.direction(zero, g0)
    newton.destroy()
    d_err = cases.rel_error(d, np.linalg.solve(H0, -g0))
    collective_assert(err <= 1e-10 and d_err <= 1e-8 and info["ksp_iterations"] == 1
                      and abs(cost - (1 + m / n)) < 1e-12,
                      f"{kind}: ‖P⁻¹v − dense‖ rel {err:.1e}; at θ = 0 the direction's rel error {d_err:.1e} "
                      f"after {info['ksp_iterations']} KSP iterations; sweeps charged {cost}")


def test_negative_curvature_stops_cg_like_truncated_newton():
    """On an indefinite CNN Hessian (γ = 0) the KSP returns the CG iterate reached before the
    first direction of nonpositive curvature (or −g if that is the first one)."""
    built, problem, objective, F, g, H = setup(CNN_CASE, "l2", 0.0)
    lam = np.linalg.eigvalsh(H)
    newton = NewtonCG(objective, eta_max=1e-13)
    d, info = newton.direction(built.theta, g)
    x, its, why = truncated_cg(H, -g, 1e-13, 1000)
    expected = x if np.any(x) else -g
    collective_assert(lam[0] < -1e-6 and why == "negative curvature"
                      and reason_name(info["ksp_reason"]) == "CONVERGED_CG_NEG_CURVE"
                      and cases.rel_error(d, expected) <= 1e-8 and g @ d < 0,
                      f"λmin {lam[0]:.2e}; reference stopped by {why} after {its}; KSP "
                      f"{reason_name(info['ksp_reason'])} after {info['ksp_iterations']}; "
                      f"‖d − d_ref‖ rel {cases.rel_error(d, expected):.1e}; gᵀd {g @ d:.2e}")
    newton.destroy()


def test_forcing_term_follows_eisenstat_walker():
    built, problem, objective, F, g, H = setup(SOFTMAX_CASE, "l2", 0.1, hessian=False)
    newton = NewtonCG(objective, eta_max=0.5, ew_alpha=2.0)
    first = newton.forcing_term(1.0)
    newton.previous = (1.0, 0.5)
    fast = newton.forcing_term(0.1)  # 0.9·0.1² = 0.009, but the safeguard 0.9·0.5² = 0.225 > 0.1 wins
    newton.previous = (1.0, 0.2)
    fast2 = newton.forcing_term(0.1)  # safeguard 0.036 < 0.1: the plain choice 0.009
    collective_assert(first == 0.5 and abs(fast - 0.225) < 1e-15 and abs(fast2 - 0.009) < 1e-15,
                      f"η₀ {first}, {fast}, {fast2}")
    newton.destroy()


# ---------------------------------------------------------------- the softmax optimum against scipy


def numpy_objective(X, y, gamma, kind, side=28):
    """F and ∇F of mean softmax cross-entropy + γ/2·θᵀRθ in numpy, R applied by the stencil
    (the Laplacian is symmetric, so Rθ = L(Lθ) image by image)."""
    Y = np.eye(10)[y]

    def lap(w):  # zero-padded 3×3 stencil on (side, side, 10)
        padded = np.pad(w, ((1, 1), (1, 1), (0, 0)))
        return sum(regularize.STENCIL[a, b] * padded[a:a + side, b:b + side] for a in range(3) for b in range(3))

    def f(theta):
        W = theta.reshape(-1, 10)
        Z = X @ W
        Z = Z - Z.max(axis=1, keepdims=True)
        logp = Z - np.log(np.exp(Z).sum(axis=1, keepdims=True))
        loss = -np.mean(np.sum(Y * logp, axis=1))
        grad = X.T @ (np.exp(logp) - Y) / len(y)
        if kind == "l2":
            r_theta = theta
        else:
            r_theta = lap(lap(theta.reshape(side, side, 10))).ravel()
        return loss + 0.5 * gamma * theta @ r_theta, grad.ravel() + gamma * r_theta

    return f


SCIPY_CASES = [
    # the real softmax model on the first 100 bundled digits
    {"id": "l2-mnist", "kind": "l2", "gamma": 1e-2, "n": 100},
    # the Laplacian on 8×8 weight images (random images): the 28×28 one needs ~10³ HVPs
    {"id": "laplacian-8x8", "kind": "laplacian", "gamma": 1e-3, "n": 40, "side": 8},
]


@pytest.mark.parametrize("case", SCIPY_CASES, ids=lambda c: c["id"])
def test_softmax_newton_reaches_the_scipy_optimum(case):
    import scipy.optimize

    kind, gamma, n, side = case["kind"], case["gamma"], case["n"], case.get("side", 28)
    model = cases.build_model({"name": "softmax", "config": {"image_size": side}})
    if side == 28:
        samples = hessmpi.load_dataset("mnist-5k", n_samples=n)
        X, y = samples.features(), samples.y
    else:
        X, y = cases.random_data(model, n, seed=44)
        samples = hessmpi.Data(X, y)
    problem = hessmpi.Hessian(model, samples, comm=COMM).problem
    objective = training.Objective(problem, kind, gamma, training.Cost())
    newton = NewtonCG(objective)
    history = training.History()
    theta, why = training.run(newton, objective, cases.init(model, 0), history, 15, gtol=1e-10)
    newton.destroy()
    f = numpy_objective(X.reshape(n, -1), y, gamma, kind, side)
    ref = scipy.optimize.minimize(f, np.zeros(model.n_params), jac=True, method="L-BFGS-B",
                                  options={"maxiter": 20000, "maxfun": 40000, "ftol": 1e-16, "gtol": 1e-11,
                                           "maxcor": 30})
    F = history.last("loss")
    rel = abs(F - ref.fun) / abs(ref.fun)
    g = history.rows["grad_norm"]
    collective_assert(why == "gtol" and len(g) - 1 <= 15 and g[-1] < 1e-8 and rel <= 1e-9
                      and np.linalg.norm(ref.jac) < 1e-6,
                      f"{kind}: stopped by {why} after {len(g) - 1} iterations, ‖g‖ {g[-1]:.1e}; "
                      f"F {F:.15e} vs L-BFGS {ref.fun:.15e} (rel {rel:.1e}, its {ref.nit}, "
                      f"‖g_ref‖ {np.linalg.norm(ref.jac):.1e})")


# ---------------------------------------------------------------- LRSFN


@pytest.mark.parametrize("case,hessian_batch", [(SOFTMAX_CASE, 6), (CNN_CASE, 11)], ids=["softmax", "cnn"])
def test_lrsfn_step_equals_the_dense_formula(case, hessian_batch):
    """On the CNN (indefinite H, so |Λ| matters) the Hessian batch is every sample, whose
    dense Hessian is already known; the softmax case draws a real Hessian mini-batch."""
    gamma, rank, damping, lr, seed = 0.01, 4, 0.1, 0.5, 3
    built, problem, objective, F, g, H = setup(case, "l2", gamma)
    n = len(built.labels)
    batches = training.LocalBatches(problem)
    method = LowRankSaddleFreeNewton(objective, batches, seed, rank=rank, batch_size=7,
                                     hessian_batch=hessian_batch, damping=damping, learning_rate=lr, tol=1e-12)
    iteration = 2
    theta_new, info = method.step(built.theta, iteration)
    g_idx = training.batch_indices(seed, n, 7, iteration, stream=0)
    h_idx = training.batch_indices(seed, n, hessian_batch, iteration, stream=1)
    R = np.eye(built.model.n_params)
    g_b = dense_objective(built.model, built.theta, built.images[g_idx], built.labels[g_idx], gamma, R,
                          hessian=False)[1]
    H_b = H if hessian_batch == n else dense_objective(built.model, built.theta, built.images[h_idx],
                                                       built.labels[h_idx], gamma, R)[2]
    lam, Q = np.linalg.eigh(H_b)
    order = np.argsort(-np.abs(lam))
    lam, V = lam[order[:rank]], Q[:, order[:rank]]
    gap = np.abs(lam[-1]) - np.abs(np.linalg.eigvalsh(H_b)[order[rank]])
    c = V.T @ g_b
    expected = built.theta - lr * (V @ (c / (np.abs(lam) + damping)) + (g_b - V @ c) / damping)
    err = cases.rel_error(theta_new - built.theta, expected - built.theta)
    indefinite = bool(np.any(lam < 0)) if case is CNN_CASE else True  # |Λ| differs from Λ
    collective_assert(gap > 1e-6 and indefinite and err <= 1e-8
                      and np.allclose(np.sort(info["eigenvalues"]), np.sort(lam)),
                      f"gap {gap:.1e}; indefinite {indefinite}; ‖Δθ − Δθ_dense‖ rel {err:.1e}; "
                      f"λ {info['eigenvalues']} vs {lam}")


# ---------------------------------------------------------------- first-order baselines


def test_sgd_and_adam_steps_follow_their_formulas():
    built, problem, objective, F, g, H = setup(SOFTMAX_CASE, "l2", 0.01, hessian=False)
    n = len(built.labels)
    batches = training.LocalBatches(problem)
    R = np.eye(built.model.n_params)
    messages, ok = [], True
    for name, lr in (("sgd", 0.5), ("adam", 0.01)):
        opt = KerasOptimizer(name, objective, batches, seed=5, batch_size=4, learning_rate=lr)
        theta, expected = built.theta.copy(), built.theta.copy()
        m, v = np.zeros_like(theta), np.zeros_like(theta)
        for step in range(3):
            idx = training.batch_indices(5, n, 4, step)
            gb = dense_objective(built.model, expected, built.images[idx], built.labels[idx], 0.01, R,
                                 hessian=False)[1]
            if name == "sgd":
                expected = expected - lr * gb
            else:  # Adam (Kingma & Ba) as Keras computes it: ε = 1e-7; the learning rate and
                # the β of the bias corrections pass through float32 tensors
                m, v = m + (gb - m) * (1 - 0.9), v + (gb ** 2 - v) * (1 - 0.999)
                b1, b2 = float(np.float32(0.9)), float(np.float32(0.999))
                lr_t = float(np.float32(lr)) * np.sqrt(1 - b2 ** (step + 1)) / (1 - b1 ** (step + 1))
                expected = expected - m * lr_t / (np.sqrt(v) + 1e-7)
            theta, _ = opt.step(theta, step)
        err = cases.rel_error(theta - built.theta, expected - built.theta)
        ok = ok and err <= 1e-10
        messages.append(f"{name}: rel error {err:.1e}")
    collective_assert(ok, "; ".join(messages))


# ---------------------------------------------------------------- resume

CHECKPOINT_ATTRS = {**{a: "x" for a in ("model", "dataset", "n_params", "n_samples", "n_ranks", "dtype",
                                        "hessmpi_version", "command")}, "config": "{}"}


class Resumable:
    """The softmax case's problem (its data and TensorFlow functions shared) and a fresh
    objective and method of a resume test on demand (`fresh`, the objective with an empty
    cache), a checkpoint callback writing to `path`, and the run resumed from it."""

    def __init__(self, method_name, path):
        self.built = cases.build(SOFTMAX_CASE, dense=False)
        self.problem = array_problem(self.built)
        self.batches = training.LocalBatches(self.problem)
        self.method_name, self.path = method_name, path

    def fresh(self):
        objective = training.Objective(self.problem, "l2", 0.05, training.Cost())
        name, batches = self.method_name, self.batches
        if name == "newton":
            method = NewtonCG(objective)
        elif name == "newton-subsampled":  # a new subsample in every iteration
            method = NewtonCG(objective, batches=batches, hessian_batch=4, seed=1, damping=0.01)
        elif name == "newton-growing":  # n = 3, 6, 12, 13; resumed at n = 12 with an empty cache
            method = NewtonCG(objective, batches=batches, damping=0.01, grow_from=3, grow_factor=2.0)
        elif name == "lrsfn":
            method = LowRankSaddleFreeNewton(objective, batches, 1, rank=3, batch_size=5, hessian_batch=4,
                                             learning_rate=0.5)
        else:
            method = KerasOptimizer(name, objective, batches, seed=1, batch_size=5, learning_rate=0.05)
        self.method = method
        return objective, method

    def checkpoint(self, theta, history):
        if COMM.Get_rank() == 0:
            training.save(self.path, theta, history, self.method.state(), CHECKPOINT_ATTRS)
        COMM.Barrier()

    def resumed(self, iterations, every):
        """(θ, history, the iteration it started from) of the run continued from the checkpoint
        by a fresh objective and method."""
        objective, method = self.fresh()
        theta, history, state, _ = training.load_checkpoint(self.path, {}, COMM)
        start = int(history.last("iteration"))
        method.restore(state)
        objective.cost.restore(history)
        theta_end, _ = training.run(method, objective, theta, history, iterations, every)
        return theta_end, history, start


def same_rows(history, whole) -> bool:
    """Whether history holds every row of `whole` (and perhaps others) with the same numbers."""
    rows = [list(history.rows["iteration"]).index(i) for i in whole.rows["iteration"]]
    return all(np.array_equal(np.asarray(history.rows[f])[rows], whole.rows[f])
               for f in ("iteration", "loss", "grad_norm", "ksp_iterations", "sweeps", "hvps"))


@pytest.mark.parametrize("method_name, every", [("newton", 1), ("newton-subsampled", 1), ("newton-growing", 1),
                                                ("adam", 1), ("lrsfn", 1), ("adam", 3), ("newton", 3)])
def test_resumed_run_ends_where_an_uninterrupted_run_ends(method_name, every, shared_tmp_path):
    """Run 4 iterations, a row every `every`; then 2, save, build everything afresh, load and
    run 2 more: the same θ, bit for bit, and the same history rows (stopped between rows,
    the stop adds one at iteration 2)."""
    case = Resumable(method_name, str(shared_tmp_path / f"resume-{method_name}-{every}.h5"))
    objective, method = case.fresh()
    whole = training.History()
    theta_whole, _ = training.run(method, objective, case.built.theta, whole, 4, every)
    objective, method = case.fresh()
    part = training.History()
    theta_part, why = training.run(method, objective, case.built.theta, part, 4, every, stop_after=2,
                                   checkpoint=case.checkpoint)
    theta_end, history, _ = case.resumed(4, every)
    same, rows_same = np.array_equal(theta_end, theta_whole), same_rows(history, whole)
    stopped_rows = [0, 1, 2] if every == 1 else [0, 2]
    collective_assert(why == "stopped" and list(part.rows["iteration"]) == stopped_rows and same and rows_same,
                      f"{method_name}: stop reason {why}, {len(part)} rows; θ equal {same} "
                      f"(max diff {np.abs(theta_end - theta_whole).max():.1e}); history equal {rows_same}")


@pytest.mark.parametrize("method_name, every, at", [("newton", 1, 5), ("newton", 3, 8), ("lrsfn", 1, 60),
                                                    ("adam", 3, None)])
def test_a_run_stopped_inside_a_step_resumes_bit_for_bit(method_name, every, at, shared_tmp_path, monkeypatch):
    """A stop request (hessmpi.stop) at the `at`-th look for one (inside Newton's KSP solve,
    LRSFN's eigen solve: every product looks) or, for Adam, during step 2: Interrupted on
    every rank, after the checkpoint got θ_k of the step it stopped, with the method's state
    and the cost from before that step (a row of its own if it had none); resumed from it,
    the run ends on the uninterrupted θ bit for bit, with the same history rows and HVP counts."""
    from hessmpi import stop
    from hessmpi.errors import Interrupted

    case = Resumable(method_name, str(shared_tmp_path / f"stopped-{method_name}-{every}.h5"))
    objective, method = case.fresh()
    whole = training.History()
    theta_whole, _ = training.run(method, objective, case.built.theta, whole, 6, every)
    objective, method = case.fresh()
    if at is None:
        step = method.step
        method.step = lambda theta, k: (stop.request() if k == 1 else None, step(theta, k))[1]
    else:
        looks, agreed = [0], stop.agreed

        def counting(comm, flags=()):
            looks[0] += 1
            if looks[0] == at:
                stop.request()
            return agreed(comm, flags)
        monkeypatch.setattr(stop, "agreed", counting)
    try:
        training.run(method, objective, case.built.theta, training.History(), 6, every, checkpoint=case.checkpoint)
        stopped = ""
    except Interrupted as e:
        stopped = str(e)
    finally:
        monkeypatch.undo()
        stop.clear()
    theta_end, history, resumed_at = case.resumed(6, every)
    same = np.array_equal(theta_end, theta_whole)
    print(f"{method_name} every {every}: {stopped}; resumed at {resumed_at}")
    where = "before iteration" if at is None else "products"  # Newton, LRSFN: inside a step
    collective_assert(where in stopped and same and same_rows(history, whole) and 0 < resumed_at < 6,
                      f"{method_name}: {stopped!r}; resumed at iteration {resumed_at}; θ equal {same}; "
                      f"history rows equal {same_rows(history, whole)}")
