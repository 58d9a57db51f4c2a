"""hessmpi.keras.HessianMonitor during a real `model.fit`, against dense Hessians.

The model is the 63-parameter MLP with BatchNormalization and Dropout of user_models:
training moves its weights and its moving statistics, and the monitor must measure the
model as it is at each record. The references are dense Hessians and GGNs built with
nested GradientTapes over the Keras model (test_user_models' functions, none of
hessmpi's code) at the weights of the record: eigvalsh for the top eigenvalues, the exact
trace, the exact fraction of eigenvalues below −σ (σ the quadrature's smoothing width).

Runs single-rank and under mpirun -n 2/3: every rank trains the same model on the same
data, and the 7 evaluation samples are split over the ranks (uneven shards).
"""

from __future__ import annotations

import numpy as np
import pytest

from hessmpi import runtime

runtime.configure_threads(1)
runtime.import_tensorflow()

import keras  # noqa: E402

import hessmpi  # noqa: E402
import user_models  # noqa: E402
from hessmpi.keras import HessianMonitor  # noqa: E402
from mpi_util import collective_assert  # noqa: E402
from test_user_models import N, dense_ggn, dense_hessian  # noqa: E402

N_PARAMS = 63
LOSS = keras.losses.sparse_categorical_crossentropy


def silent(line):
    pass


def make_run(seed: int = 0):
    """The model (compiled with SGD), 40 training samples and the 7 evaluation samples."""
    keras.utils.set_random_seed(seed)  # the same Dropout masks on every rank
    model = user_models.mlp_bn(seed)
    model.compile(optimizer=keras.optimizers.SGD(0.2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(seed + 10)
    x, y = rng.standard_normal((40, 4)), rng.integers(0, 3, 40)
    x_eval, y_eval = rng.standard_normal((N, 4)), rng.integers(0, 3, N)
    return model, (x, y), (x_eval, y_eval)


def reference(model, data, operator="hessian") -> np.ndarray:
    loss = lambda y, z: LOSS(y, z, from_logits=True)  # noqa: E731
    return (dense_hessian if operator == "hessian" else dense_ggn)(model, *data, loss)


class Snapshots(keras.callbacks.Callback):
    """The dense Hessian of the evaluation set at the end of every epoch, taken after the
    monitor's record of the same epoch (callbacks run in order)."""

    def __init__(self, data, operator):
        super().__init__()
        self.data, self.operator, self.matrices = data, operator, []

    def on_epoch_end(self, epoch, logs=None):
        self.matrices.append(reference(self.model, self.data, self.operator))


@pytest.mark.parametrize("operator", ["hessian", "ggn"])
def test_every_record_matches_the_dense_matrix_at_its_weights(operator, shared_tmp_path):
    model, train, evaluation = make_run()
    path = str(shared_tmp_path / "monitor.h5")
    probes = 16 if operator == "hessian" else 2  # a GGN has nothing below −σ: two probes show it
    monitor = HessianMonitor(evaluation, path, top=3, tol=1e-12, trace_products=3 * N_PARAMS, mass_probes=probes,
                             mass_steps=N_PARAMS, operator=operator, log=silent)
    snapshots = Snapshots(evaluation, operator)
    before = reference(model, evaluation, operator)
    model.fit(*train, batch_size=10, epochs=2, shuffle=False, verbose=0, callbacks=[monitor, snapshots])
    rows = monitor.datasets
    assert list(rows["monitor/epoch"]) == [0, 1, 2] and list(rows["monitor/step"]) == [0, 4, 8]
    for i, dense in enumerate([before] + snapshots.matrices):
        exact = np.linalg.eigvalsh(dense)
        scale = np.abs(exact).max()
        top = rows["monitor/top_eigenvalues"][i]
        below = np.mean(exact < rows["monitor/negative_threshold"][i])  # the fraction below −σ
        mass, mass_err = rows["monitor/negative_mass"][i], rows["monitor/negative_mass_stderr"][i]
        collective_assert(np.abs(top - exact[::-1][:3]).max() <= 1e-8 * scale
                          and abs(rows["monitor/trace"][i] - np.trace(dense)) <= 1e-8 * np.abs(exact).sum()
                          and abs(mass - below) <= 4 * mass_err + 0.02,
                          f"record {i}: top {top} vs {exact[::-1][:3]}, trace {rows['monitor/trace'][i]} vs "
                          f"{np.trace(dense)}, mass below −σ {mass} ± {mass_err} vs {below}")
    if operator == "ggn":
        collective_assert(np.all(rows["monitor/negative_mass"] <= 0.02), "a GGN has no negative eigenvalues")
    saved, attrs = hessmpi.read_results(path, "monitor")
    np.testing.assert_array_equal(saved["monitor/top_eigenvalues"], rows["monitor/top_eigenvalues"])
    assert attrs["operator"] == operator and attrs["n_samples"] == N
    assert np.all(np.diff(saved["monitor/train_time"]) > 0) and np.all(saved["monitor/n_matvecs"] > 0)


def test_records_every_k_steps_and_draws_them(shared_tmp_path):
    model, train, evaluation = make_run(seed=1)
    monitor = HessianMonitor(evaluation, every=3, unit="step", trace_products=0, mass_probes=0, log=silent)
    model.fit(*train, batch_size=5, epochs=3, verbose=0, callbacks=[monitor])  # 24 steps
    rows = monitor.datasets
    assert list(rows["monitor/step"]) == list(range(0, 25, 3))
    assert np.all(np.isnan(rows["monitor/trace"])) and np.all(np.isfinite(rows["monitor/top_eigenvalues"]))
    np.testing.assert_array_equal(rows["model/params"], np.concatenate(
        [v.numpy().ravel() for v in model.trainable_variables]))
    path = str(shared_tmp_path / "steps.png")
    fig = monitor.plot(path)
    collective_assert(len(fig.axes) == 1, f"{len(fig.axes)} panels for the top eigenvalue alone")
    if runtime.rank() == 0:
        from hessmpi.plots import draw_file

        monitor.save(str(shared_tmp_path / "steps.h5"))
        assert draw_file(str(shared_tmp_path / "steps.h5")) == [str(shared_tmp_path / "steps.png")]


def test_ranks_that_train_differently_are_refused_on_every_rank():
    if runtime.world().Get_size() == 1:
        pytest.skip("one rank: nothing to differ from; runs in the mpirun -n 2 and -n 3 passes")
    model, train, evaluation = make_run(seed=2)
    monitor = HessianMonitor(evaluation, trace_products=0, mass_probes=0, log=silent)
    x, y = train
    with pytest.raises(hessmpi.HessmpiError, match="the ranks' models differ"):  # each rank its own data
        model.fit(x + runtime.world().Get_rank(), y, batch_size=10, epochs=1, verbose=0, callbacks=[monitor])
    assert len(monitor.rows) == 1  # the record before training, when the ranks still agreed


@pytest.mark.parametrize("settings, message", [
    ({"unit": "batch"}, "unit must be one of"),
    ({"every": 0}, "every must be at least 1"),
    ({"trace_products": 2}, "trace_products must be 0 or at least 3"),
    ({"operator": "fisher"}, "operator must be"),
    ({"top": 0, "trace_products": 0, "mass_probes": 0}, "nothing to record"),
])
def test_bad_settings_are_refused_with_one_message(settings, message):
    with pytest.raises(hessmpi.HessmpiError, match=message):
        hessmpi.keras.HessianMonitor((np.zeros((2, 4)), np.zeros(2)), **settings)  # the lazy attribute
