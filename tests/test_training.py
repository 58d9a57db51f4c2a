"""Tests of the shared training machinery (hessmpi.training): mini-batches, the objective's
cost accounting, history and checkpoints, the comparison plot; and scripts/newton.py
and scripts/compare.py end to end (serial: they launch mpirun themselves).
"""

import os

import numpy as np
import pytest

import petsc4py

petsc4py.init()

from hessmpi import runtime  # noqa: E402

runtime.configure_threads(1)
tf = runtime.import_tensorflow()

from hessmpi import results, training  # noqa: E402
from hessmpi.errors import HessmpiError  # noqa: E402

import cases  # noqa: E402
from mpi_util import collective_assert, comm, run_mpi  # noqa: E402

COMM = comm()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTRS = {"model": "softmax", "dataset": "synthetic", "n_params": 160, "n_samples": 13, "n_ranks": 1,
         "dtype": "float64", "hessmpi_version": "test", "command": "test"}


def test_batches_are_seeded_epochs_of_permutations():
    n, b = 23, 5
    stream = np.concatenate([training.batch_indices(7, n, b, k) for k in range(14)])  # 70 = 3 epochs + 1
    epochs_ok = all(sorted(stream[e * n:(e + 1) * n]) == list(range(n)) for e in range(3))
    again = np.array_equal(training.batch_indices(7, n, b, 9), stream[45:50])
    other_stream = not np.array_equal(training.batch_indices(7, n, b, 0, stream=1), stream[:5])
    other_seed = not np.array_equal(training.batch_indices(8, n, b, 0), stream[:5])
    with pytest.raises(HessmpiError, match="batch size"):
        training.batch_indices(7, n, n + 1, 0)
    collective_assert(epochs_ok and again and other_stream and other_seed,
                      f"epochs {epochs_ok}, deterministic {again}, streams differ {other_stream}, "
                      f"seeds differ {other_seed}")


def test_minibatch_gradient_is_the_dense_one_on_any_rank_count():
    """Each rank sums the batch samples it owns; the all-reduced mean equals the TF gradient
    of those samples (13 samples: uneven and, at 3 ranks, some batches miss a rank)."""
    case = {"id": "softmax-N13", "model": cases.SOFTMAX_TINY, "seed": 50, "noise": 0.3, "data_seed": 51,
            "n_samples": 13}
    built = cases.build(case, dense=False)
    from test_newton import ArrayProblem, dense_objective

    problem = ArrayProblem(built.model, built.images, built.labels)
    objective = training.Objective(problem, "l2", 0.1, training.Cost())
    batches = training.LocalBatches(built.model, problem.images, problem.labels, 13, COMM)
    errors = []
    for step, size in ((0, 1), (1, 4), (5, 13)):
        idx = training.batch_indices(3, 13, size, step)
        g = batches.gradient(objective, built.theta, idx)
        ref = dense_objective(built.model, built.theta, built.images[idx], built.labels[idx], 0.1,
                              np.eye(160), hessian=False)[1]
        errors.append(cases.rel_error(g, ref))
    sweeps = objective.cost.sweeps
    collective_assert(max(errors) <= 1e-13 and abs(sweeps - 18 / 13) < 1e-15,
                      f"relative errors {errors}; sweeps {sweeps} (expected 18/13)")


def test_objective_charges_a_sweep_only_for_what_the_method_needs():
    case = {"id": "softmax-N5", "model": cases.SOFTMAX_TINY, "seed": 52, "noise": 0.1, "data_seed": 53,
            "n_samples": 5}
    built = cases.build(case, dense=False)
    from test_newton import ArrayProblem

    objective = training.Objective(ArrayProblem(built.model, built.images, built.labels), "l2", 0.1,
                                   training.Cost())
    charged = []
    objective.value_grad(built.theta, count=False)  # evaluation for the history: free
    charged.append(objective.cost.sweeps)
    objective.value_grad(built.theta)  # the method needs it: charged now, once
    objective.value_grad(built.theta)
    charged.append(objective.cost.sweeps)
    objective.value_grad(built.theta + 1.0)
    charged.append(objective.cost.sweeps)
    collective_assert(charged == [0.0, 1.0, 2.0], f"sweeps after each call: {charged}")


def test_checkpoint_round_trip_and_settings_check(shared_tmp_path):
    path = str(shared_tmp_path / "ckpt.h5")
    history = training.History()
    for k in range(3):
        history.append(**{f: k + (0 if f in ("iteration", "ksp_iterations", "ksp_reason", "hvps") else 0.5)
                          for f in training.HISTORY_FIELDS})
    theta = np.linspace(0, 1, 160)
    attrs = dict(ATTRS, config='{"gamma": 0.1, "method": "adam"}')
    if COMM.Get_rank() == 0:
        training.save(path, theta, history, {"optimizer/0": np.arange(3), "forcing": np.array([1.0, 0.5])}, attrs)
    COMM.Barrier()
    t, h, state, _ = training.load_checkpoint(path, {"gamma": 0.1, "method": "adam"}, COMM)
    same = (np.array_equal(t, theta) and all(h.rows[f] == history.rows[f] for f in training.HISTORY_FIELDS)
            and np.array_equal(state["optimizer/0"], np.arange(3)) and list(state["forcing"]) == [1.0, 0.5])
    with pytest.raises(HessmpiError, match="other settings.*gamma"):
        training.load_checkpoint(path, {"gamma": 0.2, "method": "adam"}, COMM)
    with pytest.raises(HessmpiError, match="--resume"):
        training.load_checkpoint(str(shared_tmp_path / "missing.h5"), {}, COMM)
    collective_assert(same, "the checkpoint does not read back what was saved")


def test_compare_prints_a_table_and_writes_a_png(tmp_path, compare_script):
    if COMM.Get_rank() > 0:  # no MPI in compare.py: rank 0 checks it once
        collective_assert(True)
        return
    paths = []
    for method, acc in (("newton", (0.1, 0.8, 0.9)), ("sgd", (0.1, 0.5, 0.85))):
        history = training.History()
        for k, a in enumerate(acc):
            row = {f: 0.0 for f in training.HISTORY_FIELDS}
            row.update(iteration=k, loss=1.0 / (k + 1), test_accuracy=a, sweeps=3.0 * k, wall_time=k)
            history.append(**row)
        path = str(tmp_path / f"{method}.h5")
        training.save(path, np.zeros(160), history, {}, dict(ATTRS, method=method))
        paths.append(path)
    lines = compare_script.table([(p, *results.read(p, "newton")) for p in paths], target=0.85)
    out = str(tmp_path / "cmp.png")
    status = compare_script.main([*paths, "--out", out, "--target", "0.85"])
    ok = (status == 0 and os.path.getsize(out) > 1000 and "0.9000" in lines[1] and lines[1].split()[-1] == "6.00"
          and lines[2].split()[-1] == "6.00")
    missing = compare_script.main([paths[0], str(tmp_path / "nope.h5"), "--out", out])
    from hessmpi import training_plots

    one = str(tmp_path / "one.png")
    training_plots.history(*results.read(paths[0], "newton"), one)
    collective_assert(ok and missing == 2 and os.path.getsize(one) > 1000,
                      "\n".join(lines) + f"\nstatus {status}, missing file {missing}")


@pytest.fixture(scope="module")
def compare_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_script", os.path.join(ROOT, "scripts", "compare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the script, end to end

NEWTON = os.path.join(ROOT, "scripts", "newton.py")
FLAGS = ["--n-samples", "200", "--gamma", "1e-2", "--iterations", "4", "--n-test", "300", "--no-plot"]


def newton_in_process(out, *extra):
    """scripts/newton.py run inside this (single-rank) test process, as `python scripts/newton.py`."""
    import runpy
    import sys

    saved = sys.argv
    sys.argv = [NEWTON, "--out", out, *FLAGS, *extra]
    try:
        runpy.run_path(NEWTON, run_name="__main__")
    finally:
        sys.argv = saved
    return results.read(out, "newton")


@pytest.mark.serial
def test_newton_script_resumes_where_an_uninterrupted_run_ends(tmp_path):
    """Stopped after 2 of 4 iterations and resumed, on 2 ranks, the script ends where an
    uninterrupted run on 1 rank ends (to rounding: the rank counts differ)."""
    part = str(tmp_path / "part.h5")
    proc = run_mpi(2, [NEWTON, "--out", part, *FLAGS, "--stop-after", "2"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    stopped, s_attrs = results.read(part, "newton")
    assert "continue with --resume" in proc.stdout and s_attrs["finished"] == 0
    assert list(stopped["newton/iteration"]) == [0, 1, 2]
    proc = run_mpi(2, [NEWTON, "--out", part, *FLAGS, "--resume"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resuming at iteration 2" in proc.stdout and proc.stdout.count("hessmpi 0.1.0") == 1
    resumed, attrs = results.read(part, "newton")
    ref, _ = newton_in_process(str(tmp_path / "whole.h5"))
    np.testing.assert_allclose(resumed["model/params"], ref["model/params"], rtol=0, atol=1e-11)
    np.testing.assert_allclose(resumed["newton/loss"], ref["newton/loss"], rtol=1e-13)
    for f in ("iteration", "test_accuracy", "ksp_iterations", "ksp_reason", "hvps", "sweeps"):
        np.testing.assert_array_equal(resumed[f"newton/{f}"], ref[f"newton/{f}"], err_msg=f)
    # the contract and the run record
    assert attrs["finished"] == 1 and attrs["method"] == "newton" and attrs["n_ranks"] == 2
    assert attrs["n_samples"] == 200 and attrs["n_params"] == 7840 and attrs["n_matvecs"] == ref["newton/hvps"][-1] > 0
    assert np.all(np.diff(ref["newton/loss"]) < 0) and np.all(ref["newton/ksp_iterations"][1:] > 0)
