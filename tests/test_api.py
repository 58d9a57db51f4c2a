"""The public API's promises about objects, files and misuse, at any rank count: a checkpoint
is kept until the result is saved and refuses another problem; training writes θ back
into the Keras model and takes only a problem's own curvature; a Problem is not silently
rebuilt; .npz paths and tf.data of unknown length; results and rank curves the same on
every rank. Assertions are collective."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hessmpi import runtime

runtime.configure_threads(1)
tf = runtime.import_tensorflow()

import hessmpi  # noqa: E402
import user_models  # noqa: E402
from mpi_util import collective_assert, comm  # noqa: E402

COMM = comm()
N = 7


def silent(line):
    pass


@pytest.fixture(scope="module")
def regression():
    """A compiled regression MLP on 7 samples, the same on every rank."""
    model = user_models.regression_mlp()
    model.compile(loss="mse")
    rng = np.random.default_rng(0)
    return model, rng.standard_normal((N, 3)), rng.standard_normal((N, 2))


def raises(fn, *words) -> str:
    """'' if fn() raises a HessmpiError whose message holds every word, else what happened."""
    try:
        fn()
    except hessmpi.HessmpiError as e:
        missing = [w for w in words if w not in str(e)]
        return f"message lacks {missing}: {e}" if missing else ""
    return "no error"


def test_a_checkpoint_stays_until_the_result_is_saved_and_refuses_another_loss(regression, shared_tmp_path):
    model, x, y = regression
    path = str(shared_tmp_path / "top.ckpt")
    out = str(shared_tmp_path / "top.h5")
    H = hessmpi.Hessian(model, (x, y))
    top = hessmpi.eigenpairs(H, k=2, error_groups=0, checkpoint=path, log=silent)
    COMM.Barrier()
    kept = os.path.exists(path)
    huber = hessmpi.Hessian(model, (x, y), loss="huber")
    refused = raises(lambda: hessmpi.eigenpairs(huber, k=2, error_groups=0, checkpoint=path, log=silent),
                     "written by a different run", "loss")
    other_data = hessmpi.Hessian(model, (x, 2 * y))
    refused_data = raises(lambda: hessmpi.eigenpairs(other_data, k=2, error_groups=0, checkpoint=path, log=silent),
                          "data_fingerprint")
    sum_refused = raises(lambda: hessmpi.eigenpairs(H + 0.1 * hessmpi.Identity(H.n), k=2, checkpoint=path,
                                                    log=silent), "not a sum")
    again = hessmpi.eigenpairs(H, k=2, error_groups=0, checkpoint=path, log=silent)  # resumes: same pairs
    top.save(out)
    COMM.Barrier()
    gone = not os.path.exists(path) and os.path.exists(out)
    collective_assert(kept and not refused and not refused_data and not sum_refused and gone
                      and np.allclose(again.values, top.values, rtol=1e-12),
                      f"kept {kept}; other loss: {refused}; other data: {refused_data}; sum: {sum_refused}; "
                      f"removed once saved {gone}")


def test_training_writes_theta_into_the_keras_model_and_takes_only_a_problems_curvature(regression):
    model, x, y = regression
    before = [w.copy() for w in model.get_weights()]
    H = hessmpi.Hessian(model, (x, y))
    run = hessmpi.train(hessmpi.GGN(H), method="adam", iterations=3, lr=0.01, batch_size=3, gamma=0.0, log=silent)
    trained = np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables])
    moved = not all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    refused = [raises(lambda: hessmpi.train(H + 0.1 * hessmpi.Identity(H.n), log=silent), "not a sum"),
               raises(lambda: hessmpi.train(hessmpi.Hessian(H.problem, layer="out"), log=silent), "layer=")]
    for w, v in zip(before, model.weights):  # the fixture's model, as it was
        v.assign(w)
    collective_assert(np.array_equal(trained, run.theta) and moved and refused == ["", ""],
                      f"θ written back {np.array_equal(trained, run.theta)}, moved {moved}; refusals {refused}")


def test_a_problem_is_not_silently_rebuilt(regression):
    model, x, y = regression
    H = hessmpi.Hessian(model, (x, y))
    G = hessmpi.GGN(H)
    messages = [raises(lambda: hessmpi.GGN(H, (x, y)), "data cannot change a problem"),
                raises(lambda: hessmpi.Hessian(H, loss="mae", n_samples=3), "loss, n_samples cannot change"),
                raises(lambda: hessmpi.regularizer("l2", hessmpi.Hessian(H, layer="out")), "all the parameters")]
    collective_assert(G.problem is H.problem and messages == ["", "", ""], f"{messages}")


def test_an_npz_path_is_data(regression, shared_tmp_path):
    model, x, y = regression
    path = str(shared_tmp_path / "d.npz")
    if COMM.Get_rank() == 0:
        np.savez(path, x_train=x, y_train=y)
    COMM.Barrier()
    v = np.random.default_rng(1).standard_normal(hessmpi.Hessian(model, (x, y)).n)
    a, b = hessmpi.Hessian(model, path) @ v, hessmpi.Hessian(model, (x, y)) @ v
    collective_assert(np.array_equal(a, b), f"‖from the file − from the arrays‖ {np.linalg.norm(a - b)}")


def test_a_stream_of_unknown_length_is_counted(regression):
    model, x, y = regression
    stream = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True)  # cardinality unknown
    short = raises(lambda: hessmpi.Hessian(model, stream, n_samples=N + 1), f"n_samples {N + 1} is out of range",
                   f"has {N} samples")
    v = np.random.default_rng(2).standard_normal(model.count_params())
    same = np.allclose(hessmpi.Hessian(model, stream, n_samples=N) @ v, hessmpi.Hessian(model, (x, y)) @ v,
                       rtol=1e-12)
    collective_assert(not short and same, f"too many samples asked: {short}; same operator {same}")


def test_a_rank_curve_is_the_same_on_every_rank():
    H = hessmpi.Hessian("softmax", "mnist-5k", n_samples=6)
    curve = hessmpi.rank_curve(H, batch_sizes=(5, 1, 5), log=silent)
    mine = {k: np.asarray(v) for k, v in curve.datasets.items() if not k.endswith("seconds")}  # timings are each rank's
    everyone = COMM.allgather(mine)
    def equal(a, b):
        return np.array_equal(a, b, equal_nan=a.dtype.kind == "f")

    differ = sorted({k for d in everyone for k in mine if k not in d or not equal(d[k], mine[k])})
    same = not differ and all(d.keys() == mine.keys() for d in everyone)
    collective_assert(same and list(curve.batch_sizes) == [1, 5] and list(curve.ranks) == [9, 45]
                      and "rank_curve/dead_pixels" in mine,
                      f"differ between ranks: {differ}; sizes {list(curve.batch_sizes)}, ranks {list(curve.ranks)}")


def test_verify_refuses_what_it_would_not_check(regression):
    model, x, y = regression
    H = hessmpi.Hessian(model, (x, y))
    messages = [raises(lambda: hessmpi.verify(hessmpi.GGN(H)), "verify checks a problem's Hessian"),
                raises(lambda: hessmpi.verify(hessmpi.Hessian(H, layer="out")), "without layer=")]
    collective_assert(messages == ["", ""], f"{messages}")


def test_error_bars_give_the_true_residuals_and_count_their_products():
    """With error bars the true residuals come from their group products: on a model with
    weight penalties (a part of H that is no mean over samples) they are ‖Hv − λv‖ of the
    dense matrix, and those products are counted, one per pair as without error bars."""
    rng = np.random.default_rng(24)
    x, y = rng.standard_normal((9, 4)), np.eye(3)[rng.integers(0, 3, 9)]
    H = hessmpi.Hessian(user_models.regularized(), (x, y), loss="categorical_crossentropy")
    dense = H @ np.eye(H.n)
    before = H.n_matvecs
    bars = hessmpi.eigenpairs(H, k=3, error_groups=3, tol=1e-4, log=silent)
    counted = H.n_matvecs - before
    plain = hessmpi.eigenpairs(H, k=3, error_groups=0, tol=1e-4, log=silent)
    expected = np.linalg.norm(bars.vectors @ dense - bars.values[:, None] * bars.vectors, axis=1)
    scale = np.abs(bars.values).max()
    collective_assert(np.allclose(bars.residuals, expected, rtol=1e-6, atol=1e-14 * scale)
                      and np.allclose(plain.residuals, expected, rtol=1e-6, atol=1e-14 * scale)
                      and bars.n_matvecs == counted == plain.n_matvecs == bars.attrs["n_matvecs"]
                      and bars.attrs["errorbar_products"] == 3,
                      f"residuals {bars.residuals} (without error bars {plain.residuals}), dense {expected}; "
                      f"products {bars.n_matvecs}, counted {counted}, without error bars {plain.n_matvecs}")
