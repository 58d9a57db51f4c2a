"""What happens when things go wrong: the real scripts, given bad input or a failing rank.

Every case asserts the exit status, the one message, the time to exit and the state
of the output file (not created, or the previous one intact). Bad inputs must be
rejected before TensorFlow starts: the scripts run through WATCH, which only records
an import of tensorflow in a file before running the script as `python script.py`
would, and the test fails if one was recorded.
"""

import glob
import gzip
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from hessmpi import results
from mpi_util import MPI_ENV, descendants, run_mpi

pytestmark = pytest.mark.serial
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
SPECTRUM = os.path.join(SCRIPTS, "spectrum.py")
# Seconds; generous for a loaded 2-core CI machine. A bad input takes about 2 s here
# (Python, MPI and PETSc start-up), a job ended by an error or a signal a few seconds.
EXIT_BOUND = 30.0
UNUSED_WARNING = "WARNING! There are options you set that were not used!"
WATCH = """\
import importlib.abc, os, runpy, sys


class RecordTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow":
            with open(os.environ["HESSMPI_TEST_TF_LOG"], "a") as f:
                f.write(f"{os.getpid()}\\n")
        return None  # the import itself goes on as usual


sys.meta_path.insert(0, RecordTensorFlow())
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def idx_bytes(array, magic_type=0x08):
    array = np.asarray(array, dtype=np.uint8)
    return struct.pack(">BBBB", 0, 0, magic_type, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) \
        + array.tobytes()


def write_mnist_dir(folder, n_train=20, n_test=10, train_images=None, train_labels=None):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte.gz": train_images if train_images is not None
        else idx_bytes(rng.integers(0, 256, (n_train, 28, 28))),
        "train-labels-idx1-ubyte.gz": train_labels if train_labels is not None
        else idx_bytes(np.arange(n_train) % 10),
        "t10k-images-idx3-ubyte.gz": idx_bytes(rng.integers(0, 256, (n_test, 28, 28))),
        "t10k-labels-idx1-ubyte.gz": idx_bytes(np.arange(n_test) % 10),
    }
    for name, payload in files.items():
        with gzip.open(os.path.join(folder, name), "wb") as f:
            f.write(payload)
    return folder


def run(nprocs, args, tmp, timeout=EXIT_BOUND * 4):
    """(CompletedProcess, seconds, whether TensorFlow was imported) of
    `[mpirun -n nprocs] python WATCH *args`; tmp is a folder for WATCH and its record."""
    watch, log = os.path.join(tmp, "watch.py"), os.path.join(tmp, "tensorflow-imports")
    with open(watch, "w") as f:
        f.write(WATCH)
    if os.path.exists(log):
        os.unlink(log)
    env = {"HESSMPI_TEST_TF_LOG": log}
    t0 = time.perf_counter()
    if nprocs == 1:
        proc = subprocess.run([sys.executable, watch, *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, **MPI_ENV, **env})
    else:
        proc = run_mpi(nprocs, [watch, *args], timeout=timeout, env=env)
    return proc, time.perf_counter() - t0, os.path.exists(log)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The bad (and one good) data folders, weights, data and model files of the cases."""
    tmp = str(tmp_path_factory.mktemp("bad-inputs"))
    write_user_files(tmp)
    np.savez(os.path.join(tmp, "short.npz"), params=np.zeros(100))
    np.savez(os.path.join(tmp, "nokey.npz"), theta=np.zeros(7840))
    np.savez(os.path.join(tmp, "nan.npz"), params=np.where(np.arange(7840) == 17, np.nan, 0.0))
    with open(os.path.join(tmp, "existing.h5"), "wb") as f:
        f.write(b"previous results")
    os.makedirs(os.path.join(tmp, "folder.h5"))
    return {
        "tmp": tmp,
        "good": write_mnist_dir(os.path.join(tmp, "good")),
        "trunc": write_mnist_dir(os.path.join(tmp, "trunc"), train_images=idx_bytes(np.zeros((20, 28, 28)))[:-100]),
        "magic": write_mnist_dir(os.path.join(tmp, "magic"), train_images=b"\x00\x01\x08\x03" + b"\x00" * 500),
        "counts": write_mnist_dir(os.path.join(tmp, "counts"), train_labels=idx_bytes(np.arange(19) % 10)),
    }


def write_user_files(tmp):
    """A user's inputs gone wrong: .npz data files and saved Keras models (a classifier of 3
    classes on 6 features, the same uncompiled, and one whose layers are all frozen)."""
    from hessmpi import runtime

    keras = runtime.import_keras()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 6)), np.arange(20) % 3
    np.savez(os.path.join(tmp, "good.npz"), x_train=x, y_train=y)
    np.savez(os.path.join(tmp, "nox.npz"), x=x, y_train=y)
    np.savez(os.path.join(tmp, "lengths.npz"), x_train=x, y_train=y[:19])
    np.savez(os.path.join(tmp, "nandata.npz"), x_train=np.where(x > 2, np.nan, x), y_train=y)
    np.savez(os.path.join(tmp, "wideinputs.npz"), x_train=rng.standard_normal((20, 7)), y_train=y)
    np.savez(os.path.join(tmp, "labels.npz"), x_train=x, y_train=np.arange(20) % 5)
    with open(os.path.join(tmp, "notkeras.keras"), "w") as f:
        f.write("not a model")

    def mlp(compiled=True, trainable=True):
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)])
        model.trainable = trainable
        if compiled:
            model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    mlp().save(os.path.join(tmp, "mlp.keras"))
    mlp(compiled=False).save(os.path.join(tmp, "raw.keras"))
    mlp(trainable=False).save(os.path.join(tmp, "frozen.keras"))


# (name, script, flags, message): {name} in flags is a file of the `files` fixture. Later
# flags win in argparse, so a case's own flags override the defaults run_case puts first.
BAD_INPUTS = [
    ("unknown model", "spectrum", ["--model", "mlp"], "unknown model 'mlp'"),
    ("missing model file", "spectrum", ["--model", "{tmp}/none.keras"], "none.keras: no such file"),
    ("model file that is not a Keras model", "spectrum", ["--model", "{tmp}/notkeras.keras"],
     "notkeras.keras: not a Keras model file"),
    ("npz without x_train", "spectrum", ["--data", "{tmp}/nox.npz"], "no key x_train (it has x, y_train)"),
    ("npz whose x and y differ in length", "spectrum", ["--data", "{tmp}/lengths.npz"],
     "20 rows of x and 19 of y"),
    ("non-finite data", "spectrum", ["--data", "{tmp}/nandata.npz"], "x holds NaN or infinite values"),
    ("unknown dataset", "spectrum", ["--dataset", "cifar"], "invalid choice: 'cifar'"),
    ("missing data dir", "spectrum", ["--dataset", "mnist", "--data-dir", "{tmp}/nope"], "does not exist"),
    ("truncated IDX", "spectrum", ["--dataset", "mnist", "--data-dir", "{trunc}"], "needs 15680 data bytes"),
    ("wrong IDX magic", "spectrum", ["--dataset", "mnist", "--data-dir", "{magic}"], "not an IDX file"),
    ("image and label counts differ", "spectrum", ["--dataset", "mnist", "--data-dir", "{counts}"],
     "20 images but 19 labels"),
    ("n-samples above the data", "spectrum", ["--dataset", "mnist", "--data-dir", "{good}", "--n-samples", "21"],
     "--n-samples 21 is out of range"),
    ("n-samples below 1", "spectrum", ["--n-samples", "0"], "--n-samples 0 is out of range"),
    ("nev below 1", "spectrum", ["--nev", "0"], "--nev must be between 1 and 7839"),
    ("nev not below the parameter count", "spectrum", ["--nev", "7840"], "--nev must be between 1 and 7839"),
    ("nev of a layer block", "spectrum", ["--model", "cnn", "--layer", "conv1/bias", "--nev", "32"],
     "--nev must be between 1 and 31"),
    ("unknown layer", "spectrum", ["--layer", "conv9"], "has no layer 'conv9'"),
    ("weights of the wrong length", "spectrum", ["--weights", "{tmp}/short.npz"],
     "holds 100 values but the model has 7,840"),
    ("weights without params", "spectrum", ["--weights", "{tmp}/nokey.npz"], "no key 'params'"),
    ("weights with a NaN", "spectrum", ["--weights", "{tmp}/nan.npz"], "contains NaN or infinite values"),
    ("missing weights file", "spectrum", ["--weights", "{tmp}/none.npz"], "no such file"),
    ("unwritable output", "spectrum", ["--out", "/proc/hessmpi/s.h5"], "cannot"),
    ("output folder no one can write, root included", "spectrum", ["--out", "/proc/o.h5"],
     "cannot write to /proc (No such file or directory)"),
    ("output is a folder", "spectrum", ["--out", "{tmp}/folder.h5", "--overwrite"], "is a directory"),
    ("existing output without --overwrite", "spectrum", ["--out", "{tmp}/existing.h5"],
     "exists; pass --overwrite"),
    ("dtype the model cannot use", "spectrum", ["--dtype", "float16"], "invalid choice: 'float16'"),
    ("micro-batch below 1", "spectrum", ["--micro-batch", "0"], "--micro-batch must be at least 1"),
    ("one error group", "spectrum", ["--error-groups", "1"],
     "--error-groups must be 0 (no error bars) or between 2 and the 20 samples, got 1"),
    ("negative error groups", "spectrum", ["--error-groups", "-1"], "between 2 and the 20 samples, got -1"),
    ("more error groups than samples", "spectrum", ["--error-groups", "21"], "between 2 and the 20 samples, got 21"),
    ("unwritable checkpoint", "spectrum", ["--checkpoint", "/proc/hessmpi/s.ckpt.h5"],
     "cannot create the folder of /proc/hessmpi/s.ckpt.h5"),
    ("malformed batch sizes", "rank_curve", ["--batch-sizes", "1,five,10"], "'five' is not an integer"),
    ("batch size below 1", "rank_curve", ["--batch-sizes", "1,0"], "batch sizes must be at least 1"),
    ("batch size above the samples", "rank_curve", ["--batch-sizes", "1,50"], "50 exceed the 20 available"),
    ("density: n-samples below 1", "density", ["--n-samples", "0"], "--n-samples 0 is out of range"),
    ("density: probes below 1", "density", ["--probes", "0"], "--probes must be at least 1"),
]


# Inputs that only the model can judge: TensorFlow has started when they are found, but the
# outcome is the same (one message, exit 2 on every rank, nothing written).
BAD_MODEL_INPUTS = [
    ("model input shape does not fit the data", ["--model", "{tmp}/mlp.keras", "--data", "{tmp}/wideinputs.npz"],
     "the model '{tmp}/mlp.keras' cannot take the data's inputs of shape (7,) per sample"),
    ("labels out of range for the model's outputs", ["--model", "{tmp}/mlp.keras", "--data", "{tmp}/labels.npz"],
     "labels must be in 0..2 for the model's 3 outputs, found 0..4"),
    ("unknown loss name", ["--model", "{tmp}/raw.keras", "--data", "{tmp}/good.npz", "--loss", "crossentropyy"],
     "unknown loss 'crossentropyy'"),
    ("a model compiled without a loss", ["--model", "{tmp}/raw.keras", "--data", "{tmp}/good.npz"],
     "the model was not compiled with a loss"),
    ("a model without trainable variables", ["--model", "{tmp}/frozen.keras", "--data", "{tmp}/good.npz"],
     "has no trainable variables"),
    ("weights of the wrong length for a Keras model", ["--model", "{tmp}/mlp.keras", "--data", "{tmp}/good.npz",
                                                      "--weights", "{tmp}/short.npz"],
     "holds 100 values but the model has 43"),
]


def run_case(nprocs, script, flags, out, tmp):
    return run(nprocs, [os.path.join(SCRIPTS, f"{script}.py"), "--n-samples", "20", "--out", out, *flags], tmp)


def check_rejected(run_result, message, out, before=None, tensorflow_ok=False):
    """The problems of a run that should have rejected its input (empty if none)."""
    proc, seconds, tensorflow = run_result
    text = proc.stderr
    problems = []
    if proc.returncode != 2:
        problems.append(f"exit {proc.returncode}")
    if text.count(message) != 1 or text.count("error:") != 1:
        problems.append(f"message {message!r} not printed once: {text[-1500:]!r}")
    if "Traceback" in text:
        problems.append("traceback printed")
    if tensorflow and not tensorflow_ok:
        problems.append("TensorFlow was started before the input was checked")
    if before is None and os.path.exists(out):
        problems.append("output file created")
    if before is not None and open(out, "rb").read() != before:
        problems.append("the previous output file changed")
    if seconds > EXIT_BOUND:
        problems.append(f"took {seconds:.0f} s")
    return problems


@pytest.mark.parametrize("name, script, flags, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gives_one_message_fast_and_no_file(files, tmp_path, name, script, flags, message):
    flags = [f.format(**files) for f in flags]
    existing = os.path.join(files["tmp"], "existing.h5")
    out = existing if existing in flags else str(tmp_path / "out.h5")
    before = open(out, "rb").read() if os.path.exists(out) else None
    result = run_case(1, script, flags, out, str(tmp_path))
    print(f"{name}: exit {result[0].returncode} in {result[1]:.1f} s")
    problems = check_rejected(result, message, out, before)
    assert not problems, f"{name}: " + "; ".join(problems)


@pytest.mark.parametrize("name, flags, message", BAD_MODEL_INPUTS, ids=[c[0] for c in BAD_MODEL_INPUTS])
def test_bad_input_for_the_model_gives_one_message_and_no_file(files, tmp_path, name, flags, message):
    flags = [f.format(**files) for f in flags]
    out = str(tmp_path / "out.h5")
    result = run_case(1, "spectrum", flags, out, str(tmp_path))
    print(f"{name}: exit {result[0].returncode} in {result[1]:.1f} s")
    problems = check_rejected(result, message.format(**files), out, tensorflow_ok=True)
    assert not problems, f"{name}: " + "; ".join(problems)


def test_bad_input_under_mpirun_prints_once_and_every_rank_exits(files, tmp_path):
    out = tmp_path / "s.h5"
    out.write_bytes(b"previous results")
    result = run_case(2, "spectrum", [], str(out), str(tmp_path))
    print(f"existing output under mpirun -n 2: exit {result[0].returncode} in {result[1]:.1f} s")
    problems = check_rejected(result, "exists; pass --overwrite", str(out), b"previous results")
    assert not problems, problems
    result = run_case(2, "spectrum", ["--dataset", "mnist", "--data-dir", files["trunc"]],
                      str(tmp_path / "t.h5"), str(tmp_path))
    print(f"truncated IDX under mpirun -n 2: exit {result[0].returncode} in {result[1]:.1f} s")
    problems = check_rejected(result, "needs 15680 data bytes", str(tmp_path / "t.h5"))
    assert not problems, problems
    name, flags, message = BAD_MODEL_INPUTS[1]  # found once the model is loaded, on every rank alike
    result = run_case(2, "spectrum", [f.format(**files) for f in flags], str(tmp_path / "m.h5"), str(tmp_path))
    print(f"{name} under mpirun -n 2: exit {result[0].returncode} in {result[1]:.1f} s")
    problems = check_rejected(result, message, str(tmp_path / "m.h5"), tensorflow_ok=True)
    assert not problems, problems


@pytest.mark.parametrize("script, option, prefixes, valid", [
    ("spectrum", "-hess_eps_tpye", "-hess_ (EPS), -hess_norm_ (EPS)",
     ["-hess_norm_eps_tol", "1e-3", "-hess_eps_view", "-hess_st_ksp_converged_reason"]),
    ("rank_curve", "-rank_bv_tpye", "-rank_ (BV), -hess_norm_ (EPS)",
     ["-rank_bv_orthog_refine", "ifneeded", "-hess_norm_eps_monitor"]),
    ("density", "-density_bv_orthog_refin", "-density_ (BV), -trace_ (BV)",
     ["-density_bv_orthog_refine", "ifneeded", "-trace_bv_type", "svec"]),
])
def test_a_misspelt_petsc_option_is_an_error_before_the_solve(tmp_path, script, option, prefixes, valid):
    """One message naming the option and the script's prefixes, before TensorFlow starts,
    and PETSc's own -options_left warning listing it at exit, from rank 0 only. Valid
    options next to it, of the script's solvers or read only at exit (-log_view), or
    only once a solve has run (*_converged_reason), are not reported as unknown."""
    out = tmp_path / "out.h5"
    valid = [*valid, "-log_view", f":{tmp_path / 'log.txt'}"]
    result = run(2, [os.path.join(SCRIPTS, f"{script}.py"), "--n-samples", "20", "--out", out,
                     option, "lanczos", *valid], str(tmp_path))
    proc = result[0]
    print(f"{script} {option}: exit {proc.returncode} in {result[1]:.1f} s")
    problems = check_rejected(result, f"unknown PETSc option {option} lanczos:", str(out))
    assert not problems, problems
    assert f"(its options prefixes: {prefixes})" in proc.stderr
    assert proc.stdout.count(UNUSED_WARNING) == 1, proc.stdout
    assert f"Option left: name:{option} value: lanczos" in proc.stdout
    assert "name:-log_view" not in proc.stdout and "name:-hess_norm" not in proc.stdout, proc.stdout


def test_a_nan_in_a_product_stops_every_rank_with_one_message(tmp_path):
    """Weights finite in float64 but beyond float32's range give an Inf/NaN in the first
    Hessian-vector product: NumericalError on every rank, one message naming the product
    and what to try, exit 2, no results file."""
    weights = tmp_path / "overflow.npz"
    np.savez(weights, params=1e100 * np.random.default_rng(0).standard_normal(7840))
    out = tmp_path / "s.h5"
    t0 = time.perf_counter()
    proc = run_mpi(2, [SPECTRUM, "--n-samples", "20", "--nev", "2", "--dtype", "float32", "--weights", weights,
                       "--out", out], timeout=EXIT_BOUND * 8)
    seconds = time.perf_counter() - t0
    print(f"non-finite product under mpirun -n 2: exit {proc.returncode} in {seconds:.1f} s")
    message = "product 1 of the curvature operator is not finite (NaN or Inf)"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count(message) == 1 and proc.stderr.count("error:") == 1, proc.stderr[-3000:]
    assert "--dtype float64" in proc.stderr and "Traceback" not in proc.stderr
    assert "PETSc.Error" not in proc.stderr and "PetscGarbage" not in proc.stderr, proc.stderr[-3000:]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["overflow.npz"]


def test_an_error_on_one_rank_ends_the_job_with_that_ranks_message(tmp_path):
    driver = tmp_path / "fail_on_rank_1.py"
    driver.write_text(
        "from hessmpi import cli\n"
        "def main():\n"
        "    comm = cli.world()\n"
        "    if comm.Get_rank() == 1:\n"
        "        raise cli.HessmpiError('shard 1 is corrupt')\n"
        "    comm.Barrier()  # rank 0 would wait here for ever without the abort\n"
        "cli.main_guard(main)\n")
    proc, seconds, _ = run(2, [str(driver)], str(tmp_path))
    assert proc.returncode != 0 and seconds < EXIT_BOUND
    assert "[rank 1] error: shard 1 is corrupt" in proc.stderr


def test_a_rank_killed_mid_solve_ends_the_job_and_keeps_old_results_and_checkpoint(tmp_path):
    """SIGKILL to one rank once the solve has saved its first pass: the job ends within
    seconds, the previous results file is unchanged and the checkpoint holds that pass."""
    out, checkpoint = tmp_path / "s.h5", tmp_path / "s.ckpt.h5"
    results.write(str(out), {"spectrum/eigenvalues": [1.0], "spectrum/eigenvectors": [[1.0]],
                             "spectrum/residuals": [0.0]}, {a: "old" for a in results.ROOT_ATTRS})
    before = out.read_bytes()
    cmd = ["mpirun", "-n", "2", sys.executable, SPECTRUM, "--model", "cnn", "--n-samples", "128",
           "--nev", "4", "--dtype", "float32", "--out", str(out), "--overwrite", "--checkpoint", str(checkpoint)]
    proc = subprocess.Popen(cmd, env={**os.environ, **MPI_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    seconds, seen = None, []
    try:
        for line in proc.stdout:  # wait until the first pass is checkpointed
            seen.append(line)
            if "checkpoint: 1 pass(es) saved" in line:
                break
        ranks = [p for p in descendants(proc.pid)
                 if SPECTRUM in open(f"/proc/{p}/cmdline").read().replace("\0", " ")]
        assert ranks, "no rank processes found:\n" + "".join(seen)
        t0 = time.perf_counter()
        os.kill(max(ranks), signal.SIGKILL)
        proc.wait(timeout=EXIT_BOUND)
        seconds = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"job ended {seconds:.1f} s after the kill")
    assert proc.returncode != 0 and seconds < EXIT_BOUND
    assert out.read_bytes() == before
    with h5py.File(checkpoint, "r") as f:
        assert int(f.attrs["passes"]) >= 1 and f["checkpoint/vectors"].shape[1] == 86282
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("s.h5.")]  # no temporary results file


@pytest.mark.parametrize("umask, mode", [(0o077, 0o600), (0o002, 0o664)])
def test_results_and_figures_are_created_with_the_users_umask(tmp_path, umask, mode):
    """A results file and its PNG get 0666 & ~umask, as any file the user creates: with
    umask 077 on a shared folder, θ and the eigenvectors are not readable by others."""
    out = tmp_path / "s.h5"
    previous = os.umask(umask)
    try:  # the child inherits the umask
        proc, _, _ = run(1, [os.path.join(SCRIPTS, "spectrum.py"), "--n-samples", "20", "--nev", "1",
                             "--error-groups", "0", "--out", out], tmp_path)
    finally:
        os.umask(previous)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modes = {name: oct(os.stat(tmp_path / name).st_mode & 0o777) for name in ("s.h5", "s.png")}
    assert modes == {"s.h5": oct(mode), "s.png": oct(mode)}


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 512 KiB file system of its own (a tmpfs: mounting one needs root)."""
    if os.geteuid() != 0:
        pytest.skip("a small disk is a 512 KiB tmpfs, and mounting one needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(small)], check=True)
    yield small
    subprocess.run(["umount", str(small)], check=True)


def test_results_larger_than_the_free_space_are_refused_before_any_work(small_disk, tmp_path):
    out = small_disk / "s.h5"
    proc = run(1, [os.path.join(SCRIPTS, "spectrum.py"), "--n-samples", "20", "--nev", "20", "--out", out], tmp_path)
    need = results.estimated_size(7840, 20)  # softmax: θ and 20 eigenvectors
    problems = check_rejected(proc, f"{small_disk} has 0.52 MB free and {out} needs at least {need / 1e6:.2f} MB",
                              out, tensorflow_ok=True)  # the size needs the model's parameter count
    assert not problems, problems
    assert "products" not in proc[0].stdout, "the solve ran"


def test_a_full_disk_gives_one_message_keeps_the_previous_file_and_saves_the_results_elsewhere(small_disk, tmp_path,
                                                                                             monkeypatch):
    small, spare = small_disk, tmp_path / "spare"
    spare.mkdir()
    out = small / "s.h5"
    args = [os.path.join(SCRIPTS, "spectrum.py"), "--n-samples", "20", "--nev", "1", "--error-groups", "0",
            "--out", out]
    first, _, _ = run(1, args, tmp_path)  # the previous results: 140 KB and a 35 KB PNG
    assert first.returncode == 0, first.stderr[-2000:]
    before = out.read_bytes()
    # Fill the disk to 8 KB above the bound the run checks before its work (θ and one vector,
    # 125 KB): that check passes, and the 140 KB file finds no room at the end.
    room = shutil.disk_usage(small).free - (results.estimated_size(7840, 1) + 8192)
    (small / "filler").write_bytes(b"\0" * room)
    monkeypatch.setenv("TMPDIR", str(spare))  # where the results go when --out cannot take them
    proc, _, _ = run(1, [*args, "--overwrite"], tmp_path)
    problems = check_rejected((proc, 0.0, False), f"cannot write {out} (No space left on device)", out, before)
    assert not problems, problems
    assert sorted(os.listdir(small)) == ["filler", "s.h5", "s.png"], "a temporary file was left on the full disk"
    rescued = glob.glob(str(spare / "hessmpi-*-s.h5"))
    assert len(rescued) == 1 and f"the results were written to {rescued[0]} instead" in proc.stderr
    datasets, _ = results.read(rescued[0], "spectrum")
    original, _ = results.read(str(out), "spectrum")
    np.testing.assert_allclose(datasets["spectrum/eigenvalues"], original["spectrum/eigenvalues"], rtol=1e-10)


def test_a_checkpoint_truncated_or_from_another_run_is_refused_with_one_message(tmp_path):
    """A checkpoint cut short (a copy interrupted: hessmpi's own writes are atomic) or written
    with other settings: one message, exit 2, and the file is left as it was."""
    import hessmpi

    made = tmp_path / "other.h5"  # a finished solve keeps its checkpoint until the result is saved
    hessmpi.eigenpairs(hessmpi.Hessian("softmax", "mnist-5k", n_samples=20), k=2, checkpoint=str(made),
                       log=lambda line: None)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(made.read_bytes()[:3000])
    for checkpoint, message in [(truncated, f"--checkpoint {truncated}: {truncated} is not a readable HDF5 file"),
                                (made, f"--checkpoint {made} was written by a different run (nev 2 there, 3 here)")]:
        before = checkpoint.read_bytes()
        out = tmp_path / "s.h5"
        proc = run(1, [os.path.join(SCRIPTS, "spectrum.py"), "--n-samples", "20", "--nev", "3",
                       "--checkpoint", checkpoint, "--out", out], tmp_path)
        problems = check_rejected(proc, message, str(out), tensorflow_ok=True)
        assert not problems, (checkpoint.name, problems)
        assert checkpoint.read_bytes() == before, f"{checkpoint.name} was changed"


# ---------------------------------------------------------------- stopped by a signal

CNN = ["--model", "cnn", "--dtype", "float32", "--no-plot"]
STOPPED = {  # script, flags, what to compare with the uninterrupted run
    "spectrum": ("spectrum.py", [*CNN, "--n-samples", "128", "--nev", "4", "--error-groups", "0"],
                 ["spectrum/eigenvalues", "spectrum/eigenvectors", "spectrum/residuals"]),
    "density": ("density.py", [*CNN, "--n-samples", "128", "--probes", "3", "--lanczos-steps", "25",
                               "--hutchpp", "9"], ["density/alphas", "density/betas", "trace/hutchpp/estimate"]),
    "newton": ("newton.py", [*CNN, "--n-samples", "64", "--n-test", "50", "--method", "newton", "--operator", "ggn",
                             "--gamma", "1e-3", "--iterations", "4"], ["model/params", "newton/loss", "newton/hvps"]),
    "adam": ("newton.py", [*CNN, "--n-samples", "64", "--n-test", "50", "--method", "adam", "--batch-size", "16",
                           "--iterations", "600", "--record-every", "100"],
             ["model/params", "newton/loss", "newton/sweeps"]),
}
# (run, the line after which the signal is sent, the signal, to whom: every rank, the
# last rank only, or mpirun, which passes SIGUSR1 on to the ranks)
STOP_CASES = [
    ("spectrum", "EPS nconv=", signal.SIGTERM, "ranks"),  # inside the first pass
    ("spectrum", "checkpoint: 1 pass(es) saved", signal.SIGUSR1, "one rank"),  # inside the check pass
    ("spectrum", "solving for", signal.SIGUSR1, "mpirun"),  # before or in the first products
    ("density", "probe 1/3", signal.SIGTERM, "ranks"),
    ("newton", "     1  F", signal.SIGTERM, "one rank"),
    ("adam", "   100  F", signal.SIGUSR1, "ranks"),  # between two recorded rows
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The results of each run of STOPPED, uninterrupted on 2 ranks, made when first asked for."""
    folder, done = tmp_path_factory.mktemp("uninterrupted"), {}

    def get(name):
        if name not in done:
            script, flags, _ = STOPPED[name]
            out = str(folder / f"{name}.h5")
            proc = run_mpi(2, [os.path.join(SCRIPTS, script), *flags, "--out", out], timeout=600)
            assert proc.returncode == 0, proc.stderr
            done[name] = results.read(out)
        return done[name]
    return get


@pytest.mark.parametrize("name, after, signum, whom", STOP_CASES,
                         ids=[f"{c[0]}-{c[2].name}-{c[3].replace(' ', '-')}" for c in STOP_CASES])
def test_a_signal_saves_progress_and_the_run_started_again_ends_as_an_uninterrupted_one(
        tmp_path, uninterrupted, name, after, signum, whom):
    """SIGTERM or SIGUSR1, to every rank, one rank or mpirun, during a 2-rank run with a checkpoint:
    the run saves its progress and ends with one message and status 75 within seconds; the
    same command again continues from the checkpoint and gives the uninterrupted results
    bit for bit, for at most 1.25 times the products (the one product the stop interrupted;
    Newton redoes the step it stopped)."""
    script, flags, compared = STOPPED[name]
    out, checkpoint = tmp_path / "out.h5", tmp_path / "ck.h5"
    training = script == "newton.py"
    cmd = [os.path.join(SCRIPTS, script), *flags, "--out", str(out)] + \
        (["--resume"] if training else ["--checkpoint", str(checkpoint)])
    monitor = ["-hess_eps_monitor"] if after.startswith("EPS") else []
    proc = subprocess.Popen(["mpirun", "-n", "2", sys.executable, *cmd, *monitor], env={**os.environ, **MPI_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    seen, seconds = [], None
    try:
        for line in proc.stdout:
            seen.append(line)
            if after in line:
                break
        ranks = sorted(p for p in descendants(proc.pid)
                       if script in open(f"/proc/{p}/cmdline").read().replace("\0", " "))
        assert len(ranks) == 2, "".join(seen)
        t0 = time.perf_counter()
        for pid in {"ranks": ranks, "one rank": ranks[-1:], "mpirun": [proc.pid]}[whom]:
            os.kill(pid, signum)
        stdout, stderr = proc.communicate(timeout=EXIT_BOUND)
        seconds = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stdout = "".join(seen) + stdout
    print(f"{name}: stopped {seconds:.1f} s after {signum.name}")
    assert proc.returncode == 75, stdout + stderr
    saved = checkpoint if not training else out
    assert stderr.count("stopped by") == 1 and f"stopped by {signum.name}" in stderr \
        and f"progress saved to {saved}" in stderr, stderr  # besides mpirun's note of the exit status
    assert "Traceback" not in stderr and "PETSC ERROR" not in stderr, stderr
    assert saved.exists() and (training or not out.exists())

    again = run_mpi(2, cmd, timeout=600)
    assert again.returncode == 0, again.stderr
    if after.startswith("EPS"):  # stopped inside a pass: its products are retraced, not computed again
        assert "products of the next, which it retraces" in again.stdout, again.stdout
    resumed, attrs = results.read(str(out))
    whole, whole_attrs = uninterrupted(name)
    if training:  # the iterate a stop found between two recorded rows has a row of its own
        rows = np.isin(resumed["newton/iteration"], whole["newton/iteration"])
        assert np.count_nonzero(~rows) <= 1
        resumed = {k: v[rows] if k.startswith("newton/") else v for k, v in resumed.items()}
    for dataset in compared:
        np.testing.assert_array_equal(resumed[dataset], whole[dataset], err_msg=dataset)
    if not training:  # each result counts every product computed, the interrupted run's too
        assert not checkpoint.exists()
        products, reference = attrs["n_matvecs"], whole_attrs["n_matvecs"]
        print(f"{name}: {products} products interrupted and resumed, {reference} uninterrupted")
        assert reference <= products <= reference + 1 <= 1.25 * reference


def test_a_solve_stopped_on_two_ranks_and_resumed_on_one_does_the_stopped_pass_again(tmp_path, uninterrupted):
    """The products saved by 2 ranks are not retraced by 1 (its vectors differ in their last
    bits): the resumed solve says so, does that pass again, and still gives the eigenvalues
    (to float32's rounding across rank counts)."""
    script, flags, _ = STOPPED["spectrum"]
    out, checkpoint = tmp_path / "out.h5", tmp_path / "ck.h5"
    cmd = [os.path.join(SCRIPTS, script), *flags, "--out", str(out), "--checkpoint", str(checkpoint)]
    proc = subprocess.Popen(["mpirun", "-n", "2", sys.executable, *cmd, "-hess_eps_monitor"],
                            env={**os.environ, **MPI_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if "EPS nconv=" in line:
                os.kill(proc.pid, signal.SIGUSR1)
                break
        proc.communicate(timeout=EXIT_BOUND)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 75 and checkpoint.exists()
    again = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=600,
                           env={**os.environ, **MPI_ENV}, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr
    assert "were made on 2 ranks, this run has 1: that work is done again" in again.stdout, again.stdout
    resumed, _ = results.read(str(out))
    whole, _ = uninterrupted("spectrum")
    np.testing.assert_allclose(resumed["spectrum/eigenvalues"], whole["spectrum/eigenvalues"], rtol=1e-5)
