"""The generalized Gauss-Newton operator, layer blocks and the --operator/--layer flags,
against dense matrices on tiny models.

The dense GGN is built here from scratch: the Jacobian of the logits with respect to θ
by tf.GradientTape.jacobian, times the softmax cross-entropy Hessian in logit space,
diag(p) − ppᵀ. Runs at any rank count; assertions are collective.
"""

import numpy as np
import pytest
from mpi4py import MPI

from hessmpi import runtime

runtime.init_petsc()
runtime.configure_threads(1)

from hessmpi import cli  # noqa: E402
from hessmpi.curvature import DistributedOperator  # noqa: E402
from hessmpi.errors import HessmpiError  # noqa: E402
from hessmpi.models import builtin  # noqa: E402

import cases  # noqa: E402
import reference_models  # noqa: E402
from mpi_util import collective_assert, comm  # noqa: E402

COMM = comm()
TOL = 1e-10


def dense_ggn(model, theta, images, labels) -> np.ndarray:
    """(1/N) Σᵢ Jᵢᵀ (diag(pᵢ) − pᵢpᵢᵀ) Jᵢ with Jᵢ = ∂logitsᵢ/∂θ by tape.jacobian, float64."""
    tf = runtime.import_tensorflow()
    th = tf.constant(theta, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(th)
        logits = reference_models.logits(model.kind, model.config, th, tf.constant(images, tf.float64))
    J = tape.jacobian(logits, th).numpy()  # (N, 10, n)
    p = tf.nn.softmax(logits).numpy()
    G = np.zeros((len(theta), len(theta)))
    for Ji, pi in zip(J, p):
        G += Ji.T @ (np.diag(pi) - np.outer(pi, pi)) @ Ji
    return G / len(labels)


def dense_hessian_rows(model, theta, images, labels, blocks) -> list:
    """Rows `block` of (1/N) ∂²(Σ loss)/∂θ² for each block, by nested tapes (written out
    again here; a while-loop Jacobian, cheaper than pfor for a few rows)."""
    tf = runtime.import_tensorflow()
    th = tf.constant(theta, tf.float64)
    x, y = tf.constant(images, tf.float64), tf.constant(labels, tf.int64)
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(th)
        with tf.GradientTape() as inner:
            inner.watch(th)
            loss = reference_models.loss_sum(model.kind, model.config, th, x, y)
        grad = inner.gradient(loss, th)
        rows = tf.concat([grad[b.start:b.stop] for b in blocks], axis=0)
    H = outer.jacobian(rows, th, experimental_use_pfor=False).numpy() / len(labels)
    return np.split(H, np.cumsum([b.stop - b.start for b in blocks])[:-1])


def fresh(problem, kind):
    """A new operator (its own product counter) of the problem's Hessian ('hessian') or GGN."""
    curv = problem.curvature
    return DistributedOperator(curv.hvp if kind == "hessian" else curv.ggn, curv.n_params,
                               1.0 / problem.n_samples, problem.comm)


@pytest.fixture(scope="module", params=cases.DENSE_CASES, ids=lambda c: c["id"])
def tiny(request):
    built = cases.build(request.param, dense=False)
    built.G = dense_ggn(built.model, built.theta, built.images, built.labels)
    built.problem = cases.problem(built, COMM)  # shared, so that its functions are traced once
    built.curv = built.problem.curvature
    built.vectors = np.random.default_rng(2).standard_normal((5, built.model.n_params))
    return built


# ---------------------------------------------------------------- the GGN


def test_ggn_operator_matches_dense_ggn(tiny):
    op = fresh(tiny.problem, "ggn")
    errors = [cases.rel_error(op.apply_full(v), tiny.G @ v) for v in tiny.vectors]
    lowest = np.linalg.eigvalsh(tiny.G)[0] / np.abs(tiny.G).max()
    asym = np.abs(tiny.G - tiny.G.T).max() / np.abs(tiny.G).max()
    collective_assert(max(errors) <= TOL and op.n_matvecs == 5 and lowest >= -1e-12 and asym <= 1e-12
                      and tiny.curv.tracing_count("ggn") == 1,
                      f"{tiny.case['id']}: ‖G_op v − G v‖/‖G v‖ = {errors}, {op.n_matvecs} products, "
                      f"smallest eigenvalue of G / max|G| = {lowest:.2e}, asymmetry {asym:.2e}, "
                      f"traced {tiny.curv.tracing_count('ggn')}×")


def test_ggn_equals_the_hessian_for_softmax_only(tiny):
    """Softmax logits are linear in θ, so its GGN is its Hessian; the CNN's is not (which
    also shows that the test above can tell the two apart)."""
    hess = fresh(tiny.problem, "hessian")
    gaps = [cases.rel_error(tiny.G @ v, hess.apply_full(v)) for v in tiny.vectors[:2]]
    if tiny.model.kind == "softmax":
        collective_assert(max(gaps) <= 1e-12, f"softmax: ‖Gv − Hv‖/‖Hv‖ = {gaps}")
    else:
        collective_assert(min(gaps) >= 1e-3, f"cnn: ‖Gv − Hv‖/‖Hv‖ = {gaps}, too close to tell apart")


def test_ggn_in_float32_agrees(tiny):
    op = cases.problem(tiny, COMM, dtype="float32").ggn
    errors = [cases.rel_error(op.apply_full(v), tiny.G @ v) for v in tiny.vectors[:3]]
    collective_assert(max(errors) <= 1e-5, f"float32 GGN relative errors {errors}")


@pytest.mark.parametrize("kind", ["hvp", "ggn"])
def test_products_over_sample_ranges_add_up(kind):
    """The product over rows a:b equals that of a curvature holding only those rows, also
    when the range cuts micro-batches (micro_batch 3), and ranges add up."""
    built = cases.build(cases.DENSE_CASES[0], dense=False)  # 11 samples
    whole = cases.problem(built, MPI.COMM_SELF, micro_batch=3).curvature
    rows = type(built)(**{**vars(built), "images": built.images[2:7], "labels": built.labels[2:7]})
    part = cases.problem(rows, MPI.COMM_SELF).curvature
    product = getattr(whole, kind)
    v = np.random.default_rng(4).standard_normal(built.model.n_params)
    errors = [cases.rel_error(product(v, slice(2, 7)), getattr(part, kind)(v)),
              cases.rel_error(product(v, slice(0, 4)) + product(v, slice(4, None)), product(v)),
              cases.rel_error(sum(product(v, slice(i, i + 1)) for i in range(11)), product(v))]
    empty = product(v, slice(5, 5))
    collective_assert(max(errors) <= 1e-12 and not empty.any(), f"{kind}: relative errors {errors}")


# ---------------------------------------------------------------- layer blocks


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_layer_blocks_are_the_diagonal_blocks(tiny, kind):
    """For every layer and tensor name: the restricted operator applied to v_b equals the
    block of the full operator's product with v_b embedded in zeros, and for the GGN the
    block of the dense G."""
    full = fresh(tiny.problem, kind)
    names = tiny.model.layout.layer_names()
    report, ok = [], True
    for i, name in enumerate(names):
        block = tiny.model.layout.block(name)
        op = full.block(block.start, block.stop)
        vb = tiny.vectors[i % 5][block]
        embedded = np.zeros(tiny.model.n_params)
        embedded[block] = vb
        y = op.apply_full(vb)
        errors = [cases.rel_error(y, full.apply_full(embedded)[block])]
        if kind == "ggn":
            errors.append(cases.rel_error(y, tiny.G[block, block] @ vb))
        ok &= max(errors) <= TOL and op.n == block.stop - block.start and op.block == block and op.n_matvecs == 1
        report.append(f"{name} [{block.start}:{block.stop}]: {errors}")
    expected = {"softmax": ["W"], "cnn": ["conv1", "conv2", "dense1", "dense2"]}[tiny.model.kind]
    # each block's product counts on the full operator too, next to the full product per name
    collective_assert(ok and full.n_matvecs == 2 * len(names) and [n for n in names if "/" not in n] == expected,
                      f"{kind} blocks: {report}; full operator counted {full.n_matvecs} products")


def test_layer_blocks_match_the_dense_hessian(tiny):
    """Blocks against rows of a dense Hessian by nested tapes: for the CNN conv1/bias and
    dense2/bias; for softmax, whose only layer is all of θ, rows 20:50 of W."""
    full = fresh(tiny.problem, "hessian")
    if tiny.model.kind == "softmax":
        names, blocks = ["W[20:50]"], [slice(20, 50)]
    else:
        names = ["conv1/bias", "dense2/bias"]
        blocks = [tiny.model.layout.block(name) for name in names]
    rows = dense_hessian_rows(tiny.model, tiny.theta, tiny.images, tiny.labels, blocks)
    report, ok = [], True
    for name, block, dense_rows in zip(names, blocks, rows):
        dense = dense_rows[:, block]
        op = full.block(block.start, block.stop)
        cols = np.column_stack([op.apply_full(e) for e in np.eye(block.stop - block.start)])
        error = cases.rel_error(cols, dense)
        ok &= error <= TOL
        report.append(f"{name} [{block.start}:{block.stop}]: {error:.2e}")
    collective_assert(ok, "; ".join(report))


def test_layer_names_and_unknown_layer():
    cnn = builtin.layout("cnn")
    names = cnn.layer_names()
    conv1 = cnn.block("conv1")
    kernel = cnn.block("conv1/kernel")
    last = cnn.block("dense2")
    with pytest.raises(HessmpiError) as caught:
        cnn.block("conv3")
    message = str(caught.value)
    collective_assert(names[:3] == ["conv1", "conv1/kernel", "conv1/bias"] and len(names) == 12
                      and conv1 == slice(0, 832) and kernel == slice(0, 800)
                      and last == slice(86_282 - 1_290, 86_282)
                      and all(name in message for name in names) and "'conv3'" in message,
                      f"names {names}; conv1 {conv1}, conv1/kernel {kernel}, dense2 {last}; message: {message}")


# ---------------------------------------------------------------- the flags


def problem_from_flags(*flags):
    """(the Problem, the operator to analyse) of the common flags."""
    parser = cli.common_parser("test", "unused.h5")
    args = parser.parse_args(["--dataset", "synthetic", *flags])
    return cli.problem_from_args(args, COMM)[:2]


def test_flags_choose_the_operator_and_the_layer():
    p, op = problem_from_flags("--model", "softmax", "--n-samples", "5", "--operator", "ggn")
    v = np.random.default_rng(5).standard_normal(p.n_params)
    g, h = op.apply_full(v), p.hessian.apply_full(v)
    local = op.sample_product(v)
    summed = np.empty_like(local)
    COMM.Allreduce(local, summed, op=MPI.SUM)
    ok = (op is p.ggn and op.kind == "ggn" and op.n == 7840
          and cases.rel_error(g, h) <= 1e-12 and cases.rel_error(summed / 5, g) <= 1e-12)
    collective_assert(ok, f"--operator ggn: {op.kind}, size {op.n}, softmax GGN vs Hessian "
                          f"{cases.rel_error(g, h):.2e}, shard products {cases.rel_error(summed / 5, g):.2e}")


def test_layer_flag_restricts_the_cnn_hessian():
    p, op = problem_from_flags("--model", "cnn", "--n-samples", "3", "--layer", "dense2", "--seed", "1")
    block = op.block
    vb = np.random.default_rng(6).standard_normal(block.stop - block.start)
    full = np.zeros(p.n_params)
    full[block] = vb
    y = op.apply_full(vb)
    expected = p.hessian.apply_full(full)[block]
    local = op.sample_product(vb)
    summed = np.empty_like(local)
    COMM.Allreduce(local, summed, op=MPI.SUM)
    errors = (cases.rel_error(y, expected), cases.rel_error(summed / 3, expected))
    collective_assert(op.n == 1290 and op is not p.hessian and p.hessian.n == 86_282 and op.layer == "dense2"
                      and max(errors) <= 1e-12, f"--layer dense2: size {op.n}, errors {errors}")


@pytest.mark.parametrize("flags, words", [
    (["--layer", "conv9"], ["no layer 'conv9'", "conv1/kernel", "dense2/bias"]),
    (["--operator", "fisher"], ["--operator", "hessian", "ggn"]),
])
def test_bad_operator_flags_raise(flags, words):
    try:
        problem_from_flags("--model", "cnn", "--n-samples", "2", *flags)
        outcome = "no error"
    except HessmpiError as e:
        outcome = str(e)
    collective_assert(all(w in outcome for w in words), f"{flags}: {outcome}")
