"""What happens when things go wrong: the real scripts, given bad input or a failing rank.

Every case asserts the exit status, the one message, the time to exit and the state
of the output file (not created, or the previous one intact).
"""

import gzip
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from hessmpi import results
from mpi_util import MPI_ENV, run_mpi

pytestmark = pytest.mark.serial
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECTRUM = os.path.join(ROOT, "scripts", "spectrum.py")
EXIT_BOUND = 90.0  # seconds; generous for a loaded 2-core CI machine


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


def run(nprocs, args, timeout=EXIT_BOUND * 2):
    t0 = time.perf_counter()
    if nprocs == 1:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env={**os.environ, **MPI_ENV})
    else:
        proc = run_mpi(nprocs, args, timeout=timeout)
    return proc, time.perf_counter() - t0


def bad_inputs(tmp):
    """(name, extra flags, message) for every bad input the spectrum script must reject."""
    good = write_mnist_dir(os.path.join(tmp, "good"))
    truncated = write_mnist_dir(os.path.join(tmp, "trunc"), train_images=idx_bytes(np.zeros((20, 28, 28)))[:-100])
    magic = write_mnist_dir(os.path.join(tmp, "magic"), train_images=b"\x00\x01\x08\x03" + b"\x00" * 500)
    counts = write_mnist_dir(os.path.join(tmp, "counts"), train_labels=idx_bytes(np.arange(19) % 10))
    np.savez(os.path.join(tmp, "short.npz"), params=np.zeros(100))
    np.savez(os.path.join(tmp, "nokey.npz"), theta=np.zeros(7840))
    return [
        ("unknown model", ["--model", "mlp"], "invalid choice: 'mlp'"),
        ("unknown dataset", ["--dataset", "cifar"], "invalid choice: 'cifar'"),
        ("missing data dir", ["--dataset", "mnist", "--data-dir", os.path.join(tmp, "nope")], "does not exist"),
        ("truncated IDX", ["--dataset", "mnist", "--data-dir", truncated], "needs 15680 data bytes"),
        ("wrong magic", ["--dataset", "mnist", "--data-dir", magic], "not an IDX file"),
        ("count mismatch", ["--dataset", "mnist", "--data-dir", counts], "20 images but 19 labels"),
        ("n-samples too large", ["--dataset", "mnist", "--data-dir", good, "--n-samples", "21"],
         "--n-samples 21 is out of range"),
        ("n-samples below 1", ["--n-samples", "0"], "--n-samples 0 is out of range"),
        ("nev below 1", ["--nev", "0"], "--nev must be between 1 and 7839"),
        ("nev too large", ["--nev", "7840"], "--nev must be between 1 and 7839"),
        ("weights of the wrong length", ["--weights", os.path.join(tmp, "short.npz")],
         "holds 100 values but the model has 7,840"),
        ("weights without params", ["--weights", os.path.join(tmp, "nokey.npz")], "no key 'params'"),
        ("unwritable output", ["--out", "/proc/hessmpi/s.h5"], "cannot"),
        ("dtype the model cannot use", ["--dtype", "float16"], "invalid choice: 'float16'"),
    ]


def test_every_bad_input_gives_one_message_and_no_file(tmp_path):
    failures = []
    for name, flags, message in bad_inputs(str(tmp_path)):
        out = tmp_path / "out" / f"{name.replace(' ', '_')}.h5"
        # later flags win in argparse, so the case's own flags override these defaults
        proc, seconds = run(1, [SPECTRUM, "--n-samples", "20", "--nev", "2", "--out", str(out), *flags])
        problems = []
        if proc.returncode != 2:
            problems.append(f"exit {proc.returncode}")
        if proc.stderr.count(message) != 1 or "error:" not in proc.stderr:
            problems.append(f"message {message!r} not printed once: {proc.stderr[-600:]!r}")
        if "Traceback" in proc.stderr:
            problems.append("traceback printed")
        if out.exists():
            problems.append("output file created")
        if seconds > EXIT_BOUND:
            problems.append(f"took {seconds:.0f} s")
        print(f"{name}: exit {proc.returncode} in {seconds:.1f} s")
        if problems:
            failures.append(f"{name}: " + "; ".join(problems))
    assert not failures, "\n".join(failures)


def test_bad_input_under_mpirun_prints_once_and_every_rank_exits(tmp_path):
    out = tmp_path / "s.h5"
    out.write_bytes(b"previous results")
    proc, seconds = run(3, [SPECTRUM, "--n-samples", "20", "--out", str(out)])
    assert proc.returncode != 0 and seconds < EXIT_BOUND
    assert proc.stderr.count("exists; pass --overwrite") == 1, proc.stderr
    assert out.read_bytes() == b"previous results"


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
    proc, seconds = run(2, [str(driver)])
    assert proc.returncode != 0 and seconds < EXIT_BOUND
    assert "[rank 1] error: shard 1 is corrupt" in proc.stderr


def _descendants(pid):
    children = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(stat))
            except (OSError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def test_a_rank_killed_mid_solve_ends_the_job_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "s.h5"
    results.write(str(out), {"spectrum/eigenvalues": [1.0], "spectrum/eigenvectors": [[1.0]],
                             "spectrum/residuals": [0.0]}, {a: "old" for a in results.ROOT_ATTRS})
    before = out.read_bytes()
    cmd = ["mpirun", "-n", "2", sys.executable, SPECTRUM, "--model", "cnn", "--n-samples", "400",
           "--nev", "20", "--out", str(out), "--overwrite", "-hess_eps_monitor"]
    proc = subprocess.Popen(cmd, env={**os.environ, **MPI_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        for line in proc.stdout:  # wait until the solve is under way
            if "EPS nconv" in line or "pass 1" in line or "Hessian-vector products" in line:
                break
        ranks = [p for p in _descendants(proc.pid)
                 if SPECTRUM in open(f"/proc/{p}/cmdline").read().replace("\0", " ")]
        assert ranks, "no rank processes found"
        t0 = time.perf_counter()
        os.kill(max(ranks), signal.SIGKILL)
        proc.wait(timeout=EXIT_BOUND)
        seconds = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"job ended {seconds:.1f} s after the kill")
    assert proc.returncode != 0 and seconds < 30
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]  # no temporary left behind
