"""scripts/spectrum.py on one layer's block: its eigenvalue error bars against an independent
dense computation, at 1 and 2 ranks, and a checkpointed run that is killed and resumed.

The reference is the CNN's last layer (dense2, 1,290 parameters) on the first 12 bundled
digits: each group's dense Hessian block H_g is built here from the logits' Jacobian
(tape.jacobian of the reference model's logits, independent of hessmpi), its Rayleigh
quotients vᵀH_g v/vᵀv from the stored eigenvectors, and the Student-t interval from scipy.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hessmpi import data, results, runtime
from hessmpi.models import builtin
from hessmpi.solvers import spectrum
import reference_models
from mpi_util import MPI_ENV, descendants, run_mpi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECTRUM = os.path.join(ROOT, "scripts", "spectrum.py")
N, GROUPS, LAYER, NEV = 12, 3, "dense2", 3
FLAGS = ["--model", "cnn", "--n-samples", str(N), "--layer", LAYER, "--nev", str(NEV),
         "--error-groups", str(GROUPS), "--no-plot"]


def run_spectrum(nprocs, out, *extra):
    proc = run_mpi(nprocs, [SPECTRUM, *FLAGS, "--out", out, *extra], timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, *results.read(out, "spectrum")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{nprocs: (process, datasets, attrs)} of the uninterrupted run at 1 and 2 ranks."""
    folder = tmp_path_factory.mktemp("errorbars")
    return {n: run_spectrum(n, str(folder / f"ranks{n}.h5")) for n in (1, 2)}


def group_hessians(theta):
    """The dense dense2 block of (1/n_g) Σ_{i∈g} ∇²ℓᵢ for GROUPS equal contiguous groups.

    The last layer's logits z = leaky(h·W + b) are piecewise linear in its parameters, so
    its block of ∇²ℓᵢ is exactly Jᵢᵀ(diag(pᵢ) − pᵢpᵢᵀ)Jᵢ with Jᵢ = ∂zᵢ/∂(W, b) and pᵢ =
    softmax(zᵢ). (Nested tapes over the block, as cases.dense_hessian does for a tiny
    model, backpropagate 1,290 times through the whole CNN at once: over 13 GB.)
    """
    tf = runtime.import_tensorflow()
    block = builtin.layout("cnn").block(LAYER)
    images = data.load("mnist-5k").split("train", N).features()
    head, tail = tf.constant(theta[:block.start]), tf.constant(theta[block.stop:])
    params = tf.constant(theta[block])
    size, blocks = N // GROUPS, []
    for g in range(GROUPS):
        with tf.GradientTape() as tape:
            tape.watch(params)
            z = reference_models.logits("cnn", {}, tf.concat([head, params, tail], 0),
                                        tf.constant(images[g * size:(g + 1) * size]))
        J, z = tape.jacobian(z, params).numpy(), z.numpy()  # (n_g, 10, 1290), (n_g, 10)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        A = np.einsum("nc,cd->ncd", p, np.eye(10)) - np.einsum("nc,nd->ncd", p, p)
        blocks.append(np.einsum("nci,ncd,ndj->ij", J, A, J, optimize=True) / size)
    return blocks


@pytest.mark.serial
def test_error_bars_equal_a_dense_computation_at_one_and_two_ranks(runs):
    from scipy import stats

    _, one, attrs = runs[1]
    V = one["spectrum/eigenvectors"]
    assert V.shape == (NEV, 1290) and attrs["operator_size"] == 1290
    assert attrs["layer"] == LAYER and attrs["operator"] == "hessian"
    assert attrs["error_groups"] == GROUPS and attrs["confidence"] == 0.95 and attrs["errorbar_products"] == NEV
    H_g = group_hessians(one["model/params"])
    lam = np.linalg.eigvalsh(sum(H_g) / GROUPS)[::-1][:NEV]  # equal groups: H is their mean
    np.testing.assert_allclose(one["spectrum/eigenvalues"], lam, rtol=1e-8)
    r = np.array([[v @ H @ v / (v @ v) for v in V] for H in H_g])  # (groups, nev)
    scale = abs(lam).max()
    np.testing.assert_allclose(one["spectrum/group_quotients"], r, rtol=1e-9, atol=1e-12 * scale)
    np.testing.assert_array_equal(one["spectrum/group_sizes"], [N // GROUPS] * GROUPS)
    se = r.std(axis=0, ddof=1) / np.sqrt(GROUPS)
    half = stats.t.ppf(0.975, GROUPS - 1) * se
    assert np.all(se > 1e-3 * scale), se  # a spread to measure, so the comparison means something
    np.testing.assert_allclose(one["spectrum/stderr"], se, rtol=1e-8)
    np.testing.assert_allclose(one["spectrum/ci_low"], r.mean(axis=0) - half, rtol=1e-8, atol=1e-12 * scale)
    np.testing.assert_allclose(one["spectrum/ci_high"], r.mean(axis=0) + half, rtol=1e-8, atol=1e-12 * scale)

    proc, two, attrs2 = runs[2]
    assert attrs2["n_ranks"] == 2
    for name in ("eigenvalues", "stderr", "ci_low", "ci_high", "group_quotients"):
        np.testing.assert_allclose(two[f"spectrum/{name}"], one[f"spectrum/{name}"], rtol=1e-9,
                                   atol=1e-12 * scale, err_msg=name)
    for lam_i, se_i in zip(two["spectrum/eigenvalues"], two["spectrum/stderr"]):  # printed as λ ± se [lo, hi]
        assert f"{lam_i:.6g} ± {se_i:.2g} [" in proc.stdout, proc.stdout


def passes_saved(checkpoint) -> int:
    """The passes a spectrum checkpoint holds (0 if there is none yet)."""
    import h5py

    if not os.path.exists(checkpoint):
        return 0
    with h5py.File(checkpoint, "r") as f:
        return int(f.attrs["passes"])


@pytest.mark.serial
def test_a_killed_layer_run_resumes_from_its_checkpoint_and_matches(runs, tmp_path):
    """SIGTERM to one rank of a 2-rank --layer run once its checkpoint holds a pass (as a time
    limit would), then run it again: it resumes and gives the uninterrupted run's numbers."""
    checkpoint, out = str(tmp_path / "c.ckpt"), str(tmp_path / "resumed.h5")
    cmd = ["mpirun", "-n", "2", sys.executable, SPECTRUM, *FLAGS, "--out", out, "--checkpoint", checkpoint]
    with open(tmp_path / "killed.log", "w") as log, \
            subprocess.Popen(cmd, env={**os.environ, **MPI_ENV}, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True) as proc:
        deadline = time.monotonic() + 600
        while proc.poll() is None and passes_saved(checkpoint) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:  # a rank dies at once (mpirun relays a signal to them late); mpirun ends the job
            ranks = [p for p in descendants(proc.pid)
                     if SPECTRUM in open(f"/proc/{p}/cmdline").read().replace("\0", " ")]
            os.kill(max(ranks), signal.SIGTERM)
        proc.wait(timeout=60)
    killed_log = (tmp_path / "killed.log").read_text()
    assert passes_saved(checkpoint) >= 1 and not os.path.exists(out), \
        "the run finished (or failed) before it could be killed:\n" + killed_log[-3000:]
    saved = passes_saved(checkpoint)

    proc, resumed, attrs = run_spectrum(2, out, "--checkpoint", checkpoint)
    _, whole, whole_attrs = runs[2]
    assert f"{saved} pass(es) done before" in proc.stdout and attrs["resumed_after_pass"] == saved
    # SIGTERM is a stop request: the rank's product under way is the only one computed twice
    assert whole_attrs["n_matvecs"] <= attrs["n_matvecs"] <= whole_attrs["n_matvecs"] + 1
    assert attrs["passes"] == whole_attrs["passes"]
    for name in ("eigenvalues", "residuals", "eigenvectors", "stderr", "group_quotients"):
        np.testing.assert_allclose(resumed[f"spectrum/{name}"], whole[f"spectrum/{name}"], rtol=1e-12,
                                   atol=1e-14, err_msg=name)
    assert not os.path.exists(checkpoint)


def test_a_checkpoint_holds_block_vectors_and_refuses_another_layer(tmp_path):
    """save_checkpoint stores vectors of the operator's size (not θ's); load_checkpoint gives
    them back to the same run and refuses a run of another layer or operator."""
    from types import SimpleNamespace

    from mpi4py import MPI

    from hessmpi.errors import HessmpiError

    theta, n = np.arange(50.0), 7  # a block of 7 of 50 parameters
    vectors = list(np.random.default_rng(0).standard_normal((2, n)))
    progress = SimpleNamespace(values=np.array([2.0, 1.0]), residuals=np.array([1e-9, 2e-9]), passes=1,
                               next_want=1, iterations=5, n_matvecs=40, norm_estimate=2.0, solver="krylovschur",
                               pass_log=["pass 1: 2 new pairs, best 2"])
    identity = {"model": "cnn", "n_samples": 12, "operator": "hessian", "layer": "dense2"}
    attrs = {name: "x" for name in results.ROOT_ATTRS}
    path = str(tmp_path / "c.ckpt")
    spectrum.save_checkpoint(path, progress, vectors, {}, {**attrs, **identity}, theta, n)
    saved = spectrum.load_checkpoint(path, identity, theta, MPI.COMM_SELF)
    np.testing.assert_array_equal(saved["vectors"], vectors)
    assert saved["passes"] == 1 and saved["pass_log"] == progress.pass_log
    for other in ({"layer": "dense1"}, {"layer": ""}, {"operator": "ggn"}):
        with pytest.raises(HessmpiError, match=f"{next(iter(other))} .* there"):
            spectrum.load_checkpoint(path, {**identity, **other}, theta, MPI.COMM_SELF)
    empty = SimpleNamespace(**{**vars(progress), "values": np.empty(0), "residuals": np.empty(0)})
    spectrum.save_checkpoint(path, empty, [], {}, {**attrs, **identity}, theta, n)  # a pass that found nothing
    assert spectrum.load_checkpoint(path, identity, theta, MPI.COMM_SELF)["vectors"] == []


@pytest.mark.parametrize("given, expected", [(None, 10), (0, 0), (2, 2), (12, 12)])
def test_error_groups_default_and_valid_values(given, expected):
    assert spectrum.count_groups(given, 12) == expected


@pytest.mark.parametrize("given", [1, -1, 13])
def test_error_groups_out_of_range_is_a_clear_error(given):
    from hessmpi.errors import HessmpiError

    with pytest.raises(HessmpiError, match="--error-groups must be 0 .* between 2 and the 12 samples"):
        spectrum.count_groups(given, 12)


def test_error_groups_default_is_capped_by_the_samples():
    assert spectrum.count_groups(None, 4) == 4 and spectrum.count_groups(None, 1) == 0
