"""Tests of the shared training machinery (hessmpi.optim): mini-batches, the objective's
cost accounting, history and checkpoints, the comparison table and plot, the settings'
checks; and scripts/newton.py and scripts/compare.py end to end (serial: they launch
mpirun or python themselves).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from hessmpi import runtime

runtime.init_petsc()
runtime.configure_threads(1)
tf = runtime.import_tensorflow()

import hessmpi  # noqa: E402
from hessmpi import results  # noqa: E402
from hessmpi.errors import HessmpiError  # noqa: E402
from hessmpi.optim import fit, training  # noqa: E402
from hessmpi.plots import training as training_plots  # noqa: E402

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
    from test_newton import array_problem, dense_objective

    problem = array_problem(built)
    objective = training.Objective(problem, "l2", 0.1, training.Cost())
    batches = training.LocalBatches(problem)
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
    from test_newton import array_problem

    objective = training.Objective(array_problem(built), "l2", 0.1, training.Cost())
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


def test_compare_prints_a_table_and_writes_a_png(tmp_path):
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
    lines = fit.comparison_table([(p, *results.read(p, "newton")) for p in paths], target=0.85)
    out = str(tmp_path / "cmp.png")
    compare = [sys.executable, os.path.join(ROOT, "scripts", "compare.py")]
    status = subprocess.run([*compare, *paths, "--out", out, "--target", "0.85"], capture_output=True, text=True)
    ok = (status.returncode == 0 and os.path.getsize(out) > 1000 and "0.9000" in lines[1]
          and lines[1].split()[-2:] == ["6.00", "2.0"] and lines[2].split()[-2:] == ["6.00", "2.0"]
          and lines[1] in status.stdout)
    missing = subprocess.run([*compare, paths[0], str(tmp_path / "nope.h5"), "--out", out], capture_output=True,
                             text=True)
    one = str(tmp_path / "one.png")
    training_plots.history(*results.read(paths[0], "newton"), one)
    collective_assert(ok and missing.returncode == 2 and missing.stderr.count("error: ") == 1
                      and os.path.getsize(one) > 1000,
                      "\n".join(lines) + f"\n{status.stdout}{status.stderr}\nmissing file: {missing.stderr}")


# ---------------------------------------------------------------- the script, end to end

NEWTON = os.path.join(ROOT, "scripts", "newton.py")
FLAGS = ["--n-samples", "200", "--gamma", "1e-2", "--iterations", "4", "--n-test", "300", "--no-plot"]


def newton_in_process(out):
    """What scripts/newton.py with FLAGS does, through the library in this (single-rank) process."""
    from mpi4py import MPI

    H = hessmpi.Hessian("softmax", "mnist-5k", n_samples=200, comm=MPI.COMM_SELF)
    run = fit.train(H, "newton", test=hessmpi.load_dataset("mnist-5k", "test"), n_test=300, gamma=1e-2,
                    iterations=4)
    return run.datasets(), run.attrs


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
    assert "resuming at iteration 2" in proc.stdout and proc.stdout.count(f"hessmpi {hessmpi.__version__}") == 1
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


@pytest.mark.serial
def test_a_diverging_run_stops_with_one_message_and_writes_nothing(tmp_path):
    """SGD whose steps grow θ by a factor 1e10 (--lr 1e10 with --gamma 1) overflows within
    a few dozen steps. On 2 ranks: exit status 2 everywhere, one message naming the
    iteration and what to try, no results file if no row was checkpointed yet, and the
    last checkpoint (row 10) left as it was otherwise."""
    import time

    flags = ["--method", "sgd", "--lr", "1e10", "--gamma", "1", "--n-samples", "200", "--n-test", "100",
             "--iterations", "100", "--no-plot"]
    outcomes = {}
    for every in (50, 10):
        out = tmp_path / f"every{every}.h5"
        t0 = time.perf_counter()
        proc = run_mpi(2, [NEWTON, "--out", out, *flags, "--record-every", every], timeout=600)
        outcomes[every] = (proc, out, time.perf_counter() - t0)
    for every, (proc, out, seconds) in outcomes.items():
        assert proc.returncode == 2, f"--record-every {every}: status {proc.returncode}\n{proc.stderr[-3000:]}"
        messages = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(messages) == 1, proc.stderr[-3000:]
        assert ("the run diverged in iteration" in messages[0] and "not finite" in messages[0]
                and "a smaller --lr (this run: 1e+10)" in messages[0] and "a larger --gamma" in messages[0]
                and "no results were written" in messages[0]), messages[0]
        assert "Traceback" not in proc.stderr and "RuntimeWarning" not in proc.stderr, proc.stderr[-3000:]
        assert seconds < 300, f"--record-every {every}: {seconds:.0f} s"
        assert not [p for p in os.listdir(tmp_path) if ".tmp" in p], os.listdir(tmp_path)
    iteration = int(outcomes[50][0].stderr.split("diverged in iteration ")[1].split(":")[0])
    assert 10 < iteration < 50, f"diverged in iteration {iteration}, expected between the checkpoints"
    assert not outcomes[50][1].exists(), "a run that diverged before its first checkpoint wrote a file"
    kept, attrs = results.read(str(outcomes[10][1]), "newton")
    assert list(kept["newton/iteration"]) == [0, 10] and attrs["finished"] == 0
    assert np.all(np.isfinite(kept["model/params"])) and np.all(np.isfinite(kept["newton/loss"]))


@pytest.mark.parametrize("flags,message", [
    (["--method", "sgd", "--hessian-batch", "100"], "--hessian-batch applies to --method newton and lrsfn"),
    (["--method", "adam", "--damping", "0.1"], "--damping applies to --method newton and lrsfn"),
    (["--hessian-batch", "0"], "--hessian-batch must be at least 1"),
    (["--method", "lrsfn", "--preconditioner", "kronecker"], "--preconditioner applies to --method newton"),
    (["--preconditioner", "diagonal"], "unknown preconditioner 'diagonal'"),
    (["--method", "sgd", "--grow-from", "100"], "--grow-from and --grow-factor apply to --method newton"),
    (["--grow-from", "0"], "--grow-from must be between 1 and the number of training samples"),
    (["--grow-from", "500", "--n-samples", "400"], r"--grow-from must be between 1 and .*\(400\), got 500"),
    (["--grow-factor", "2"], "--grow-factor needs --grow-from"),
    (["--grow-from", "100", "--grow-factor", "1"], "--grow-factor must be a finite number > 1"),
    (["--grow-from", "100", "--grow-factor", "nan"], "--grow-factor must be a finite number > 1"),
], ids=["batch-for-sgd", "damping-for-adam", "batch-zero", "pc-for-lrsfn", "unknown-pc", "grow-for-sgd",
        "grow-zero", "grow-above-n", "factor-alone", "factor-one", "factor-nan"])
def test_training_settings_refuse_what_does_not_apply(flags, message):
    """The settings of a training run (the flags of scripts/newton.py, checked by the library)."""
    names = {"--method": "method", "--hessian-batch": "hessian_batch", "--damping": "damping",
             "--preconditioner": "preconditioner", "--grow-from": "grow_from", "--grow-factor": "grow_factor"}
    settings, n = {}, None
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag == "--n-samples":
            n = int(value)
        else:
            kind = str if flag in ("--method", "--preconditioner") else (float if flag in (
                "--damping", "--grow-factor") else int)
            settings[names[flag]] = kind(value)
    with pytest.raises(HessmpiError, match=message):
        fit.Settings(**settings).check(n)
    defaults = fit.Settings().check()
    collective_assert(defaults.damping == 0.0 and fit.Settings(method="lrsfn").check().damping == 1.0
                      and defaults.preconditioner == "none" and defaults.hessian_batch is None
                      and defaults.grow_from is None
                      and fit.Settings(grow_from=100).check().grow_factor == 4.0)


def test_newton_rejects_a_negative_damping_and_a_kronecker_cnn():
    from test_newton import CNN_CASE, SOFTMAX_CASE, array_problem
    from hessmpi.optim.newton import NewtonCG

    errors = []
    for case, kwargs, message in ((SOFTMAX_CASE, {"damping": -1.0}, "--damping must be a finite number >= 0"),
                                  (CNN_CASE, {"preconditioner": "kronecker"}, "built for the softmax model")):
        built = cases.build(case, dense=False)
        problem = array_problem(built)
        objective = training.Objective(problem, "l2", 0.1, training.Cost())
        batches = training.LocalBatches(problem)
        try:
            NewtonCG(objective, batches=batches, **kwargs).destroy()
            errors.append(f"{kwargs}: accepted")
        except HessmpiError as e:
            if message not in str(e):
                errors.append(f"{kwargs}: {e}")
    collective_assert(not errors, "; ".join(errors))
