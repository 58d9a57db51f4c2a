"""The job templates in jobs/, run under a real single-node Slurm (tools/slurm.sh).

A module fixture starts munged, slurmctld and slurmd (installing Debian's packages if
they are missing) and always stops them by PID. Every job is submitted at once, so
they run side by side; each test then waits for its own. A template passes only if
its job ends COMPLETED with exit code 0 and its HDF5 output passes the checks of a
direct run: eigenvalues against numpy's, Newton's objective and gradient recomputed
in numpy, a resumed job against an uninterrupted one. The node declares 8 CPUs on
this 2-core machine (see tools/slurm.sh), so the templates' default `-n 8` runs here.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

from hessmpi import data, results
from mpi_util import MPI_ENV

pytestmark = pytest.mark.serial
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = os.path.join(ROOT, "jobs")
TERMINAL = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
JOB_TIMEOUT = 420  # seconds a job may take on this loaded 2-core machine

# The settings of each job: small, and a different job name each, so that their
# results folders and checkpoints are their own.
SPECTRUM = ["--n-samples", "200", "--nev", "3", "--no-plot"]
SWEEP = {"sizes": (100, 200), "flags": ["--nev", "2", "--no-plot"]}
RANK_CURVE = ["--n-samples", "200", "--batch-sizes", "1,5,10", "--no-plot"]
NEWTON = ["--n-samples", "200", "--method", "newton", "--regularization", "l2", "--gamma", "1e-3",
          "--iterations", "2", "--n-test", "100", "--no-plot"]
# About 80 products (20 s of them here), long enough to be stopped twice inside a pass.
TIMED = ["--model", "cnn", "--n-samples", "600", "--nev", "6", "--dtype", "float32", "--error-groups", "0",
         "--no-plot"]
WARNINGS = 2  # the time-limit warnings the test sends the job, one per start
TWO_RANKS = ["--ntasks=2"]


class Slurm:
    """A running private cluster: submit templates, follow jobs, find their files."""

    def __init__(self, folder: str, conf: str):
        self.folder = folder
        self.submit_dir = os.path.join(folder, "submit")  # sbatch's cwd: the jobs' .out files
        self.results = os.path.join(folder, "results")  # HESSMPI_RESULTS of every job
        os.makedirs(self.submit_dir)
        # sbatch passes this environment on; PATH stays the caller's, whose first python
        # may lack the MPI stack (the templates must not depend on it).
        # (Slurm variables of an enclosing job, if the suite runs in one, are left out.)
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "SBATCH_"))}
        self.env = {**inherited, "SLURM_CONF": conf, "HESSMPI_HOME": ROOT, "HESSMPI_RESULTS": self.results}

    def run(self, *cmd, check=True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=self.submit_dir, env=self.env, capture_output=True, text=True,
                              timeout=60)
        assert not check or proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"
        return proc

    def submit(self, template: str, *args, sbatch=(), env=None) -> str:
        """Submit jobs/<template> with script arguments args; the job id."""
        cmd = ["sbatch", "--parsable", *sbatch, os.path.join(JOBS, template), *args]
        proc = subprocess.run(cmd, cwd=self.submit_dir, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"sbatch {template} failed: {proc.stderr}"
        return proc.stdout.strip().split(";")[0]

    def states(self, job_id: str) -> list[tuple[str, str]]:
        """(JobState, ExitCode) of the job, or of each task of an array job."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        fields = [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines()]
        return [(f["JobState"], f["ExitCode"]) for f in fields]

    def wait(self, job_id: str, tasks: int = 1, timeout: float = JOB_TIMEOUT) -> list[tuple[str, str]]:
        """Poll every 0.25 s until the job (every one of `tasks` array tasks) has ended."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.states(job_id)
            if len(states) == tasks and all(s in TERMINAL for s, _ in states):
                return states
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {states} after {timeout} s:\n{self.output(job_id)}")
            time.sleep(0.25)

    def output(self, job_id: str) -> str:
        """The job's .out files (every array task's), for failure messages."""
        text = []
        for name in sorted(os.listdir(self.submit_dir)):
            if f"-{job_id}" in name:
                with open(os.path.join(self.submit_dir, name)) as f:
                    text.append(f"--- {name}\n{f.read()[-4000:]}")
        return "\n".join(text) or f"(no output file of job {job_id})"

    def completed(self, job_id: str, tasks: int = 1):
        states = self.wait(job_id, tasks)
        assert states == [("COMPLETED", "0:0")] * tasks, f"job {job_id}: {states}\n{self.output(job_id)}"

    def result(self, name: str, job_id: str, file: str) -> str:
        return os.path.join(self.results, f"{name}-{job_id}", file)

    def checkpoint(self, name: str) -> str:
        return os.path.join(self.results, "checkpoints", f"{name}.h5")


@pytest.fixture(scope="module")
def slurm():
    folder = tempfile.mkdtemp(prefix="hessmpi-slurm-")
    tool = os.path.join(ROOT, "tools", "slurm.sh")
    try:
        proc = subprocess.run([tool, "start", folder, "8"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"tools/slurm.sh start failed:\n{proc.stdout}\n{proc.stderr}"
        conf = proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
        yield Slurm(folder, conf)
    finally:
        subprocess.run([tool, "stop", folder], timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


class Chain(threading.Thread):
    """Steps that wait on jobs and submit more, run in the background while the other
    jobs run; result() gives the test their outcome or re-raises their error."""

    def __init__(self, steps, *args):
        super().__init__(daemon=True)
        self.steps, self.args, self.value, self.error = steps, args, None, None
        self.start()

    def run(self):
        try:
            self.value = self.steps(*self.args)
        except BaseException as e:  # noqa: B036 (handed to the test)
            self.error = e

    def result(self):
        self.join(2 * JOB_TIMEOUT)
        assert not self.is_alive(), f"{self.steps.__name__} did not finish"
        if self.error is not None:
            raise self.error
        return self.value


@pytest.fixture(scope="module")
def jobs(slurm):
    """Every job of the module, submitted at once (the time-limited one first), and the
    chains that act on jobs as they progress. The continuations of the restartable
    jobs are queued at once too: the templates' --dependency=singleton holds each
    until the job of the same name has ended."""
    ids = {"timed": slurm.submit("spectrum.sbatch", *TIMED, sbatch=[*TWO_RANKS, "--job-name=timed", "--time=10"])}
    ids["reference"] = slurm.submit("spectrum.sbatch", *TIMED, sbatch=[*TWO_RANKS, "--job-name=reference"],
                                    env={"HESSMPI_LAUNCHER": "mpirun"})
    ids["newton-part"] = slurm.submit("newton.sbatch", *NEWTON, "--stop-after", "1",
                                      sbatch=[*TWO_RANKS, "--job-name=newton"])
    ids["newton-again"] = slurm.submit("newton.sbatch", *NEWTON, sbatch=[*TWO_RANKS, "--job-name=newton"])
    ids["spectrum"] = slurm.submit("spectrum.sbatch", *SPECTRUM)  # the template's defaults: 8 ranks
    ids["sweep"] = slurm.submit("spectrum-sweep.sbatch", *SWEEP["flags"],  # one rank per task: ranks cost here
                                sbatch=["--ntasks=1", f"--array=0-{len(SWEEP['sizes']) - 1}"],
                                env={"HESSMPI_SWEEP": ",".join(map(str, SWEEP["sizes"]))})
    ids["failing"] = slurm.submit("spectrum.sbatch", "--which", "biggest", sbatch=[*TWO_RANKS, "--job-name=bad"])
    if os.path.exists(os.path.join(ROOT, "scripts", "rank_curve.py")):
        ids["rank-curve"] = slurm.submit("rank-curve.sbatch", *RANK_CURVE, sbatch=TWO_RANKS)
    ids["newton-direct"] = Chain(direct_newton, os.path.join(slurm.folder, "newton-direct.h5"))
    ids["warnings"] = Chain(warn, slurm, ids["timed"])
    return ids


def warn(slurm, job):
    """Slurm's time-limit warning, as `#SBATCH --signal=B:USR1@…` sends it (SIGUSR1 to the batch
    shell), sent by the test 6 s into the solve of each of the job's first WARNINGS starts, so
    that each stop falls inside a pass. (Slurm's own warning comes when its 30-second timer
    next looks, up to a minute before the time asked for: with the one- or two-minute limits
    a test can afford, that is right at the start, or a 4-minute test.)"""
    out = os.path.join(slurm.submit_dir, f"timed-{job}.out")
    deadline = time.monotonic() + JOB_TIMEOUT
    for start in range(1, WARNINGS + 1):
        while True:
            text = open(out).read() if os.path.exists(out) else ""
            if text.count("solving for") == start:
                break
            (state, _), = slurm.states(job)
            assert state not in TERMINAL and time.monotonic() < deadline, \
                f"job {job} is {state} before warning {start}\n{text[-3000:]}"
            time.sleep(0.25)
        time.sleep(6)
        slurm.run("scancel", "--batch", "--signal=USR1", job)
        while open(out).read().count("requeueing job") < start:
            assert time.monotonic() < deadline, f"job {job} not requeued after warning {start}"
            time.sleep(0.25)


def direct_newton(out):
    """The test's Newton run launched directly with mpirun, uninterrupted; its results file."""
    proc = subprocess.run(["mpirun", "-n", "2", sys.executable, os.path.join(ROOT, "scripts", "newton.py"),
                           *NEWTON, "--out", out], env={**os.environ, **MPI_ENV}, capture_output=True,
                          text=True, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, f"the direct Newton run failed: {proc.stderr[-3000:]}"
    return out


def first_digits(n):
    """The first n bundled training digits as rows of pixels in [0, 1], and their labels."""
    digits = data.load("mnist-5k").split("train", n)
    return digits.features().reshape(n, -1), digits.y


def softmax_w0_eigenvalues(n):
    """The softmax Hessian at W = 0, independently: 0.1 · eig(XᵀX/N), each 9 times, largest first."""
    x, _ = first_digits(n)
    return np.repeat(0.1 * np.linalg.eigvalsh(x.T @ x / n)[::-1], 9)


def check_softmax_w0_spectrum(path, n, nev, n_ranks):
    datasets, attrs = results.read(path, "spectrum")
    lam, vecs = datasets["spectrum/eigenvalues"], datasets["spectrum/eigenvectors"]
    exact = softmax_w0_eigenvalues(n)
    assert attrs["n_ranks"] == n_ranks and attrs["n_samples"] == n and vecs.shape == (nev, 7840)
    np.testing.assert_allclose(lam, exact[:nev], rtol=1e-10)
    assert np.all(datasets["spectrum/residuals"] <= 1e-7 * exact[0])
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(nev), atol=1e-8)


def test_spectrum_template_with_its_defaults(slurm, jobs):
    slurm.completed(jobs["spectrum"])
    name = "hessmpi-spectrum"
    check_softmax_w0_spectrum(slurm.result(name, jobs["spectrum"], "spectrum.h5"), 200, 3, n_ranks=8)
    assert not os.path.exists(slurm.checkpoint(name)), "a finished job must remove its checkpoint"
    assert "8 rank(s), 1 TensorFlow thread(s) per rank" in slurm.output(jobs["spectrum"])


def test_sweep_array_runs_one_batch_size_per_task(slurm, jobs):
    sizes = SWEEP["sizes"]
    slurm.completed(jobs["sweep"], tasks=len(sizes))
    for task, n in enumerate(sizes):
        path = slurm.result("hessmpi-sweep", f"{jobs['sweep']}_{task}", "spectrum.h5")
        check_softmax_w0_spectrum(path, n, 2, n_ranks=1)


def test_rank_curve_template(slurm, jobs):
    if "rank-curve" not in jobs:
        pytest.fail("scripts/rank_curve.py does not exist yet, so jobs/rank-curve.sbatch cannot be proven")
    slurm.completed(jobs["rank-curve"])
    datasets, attrs = results.read(slurm.result("hessmpi-rank-curve", jobs["rank-curve"], "rank_curve.h5"),
                                   "rank_curve")
    # Softmax at W = 0: H_b = (1/b) X_bᵀX_b ⊗ (0.1·I − 0.01·11ᵀ) has rank 9·rank(X_b).
    batch_sizes = datasets["rank_curve/batch_sizes"]
    x, _ = first_digits(200)
    expected = [9 * np.linalg.matrix_rank(x[:b]) for b in batch_sizes]
    np.testing.assert_array_equal(batch_sizes, [1, 5, 10])
    np.testing.assert_array_equal(datasets["rank_curve/ranks"], expected)
    assert attrs["n_ranks"] == 2


def softmax_objective(theta, n, gamma):
    """F = mean cross-entropy + γ/2·‖θ‖² of the softmax model on the first n digits and ‖∇F‖, in numpy."""
    x, y = first_digits(n)
    logits = x @ theta.reshape(784, 10)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(n), y]))
    p[np.arange(n), y] -= 1.0
    grad = (x.T @ p).ravel() / n + gamma * theta
    return loss + 0.5 * gamma * theta @ theta, np.linalg.norm(grad)


def test_newton_template_resumes_where_a_direct_run_ends(slurm, jobs):
    slurm.completed(jobs["newton-part"])
    resumed = jobs["newton-again"]
    slurm.completed(resumed)
    direct_out = jobs["newton-direct"].result()
    part, _ = results.read(slurm.result("newton", jobs["newton-part"], "newton.h5"), "newton")
    assert list(part["newton/iteration"]) == [0, 1], "the first job should stop after one iteration"
    assert "resuming at iteration 1" in slurm.output(resumed)
    job, attrs = results.read(slurm.result("newton", resumed, "newton.h5"), "newton")
    ref, _ = results.read(direct_out, "newton")
    assert list(job["newton/iteration"]) == [0, 1, 2] and attrs["n_ranks"] == 2
    np.testing.assert_allclose(job["newton/loss"], ref["newton/loss"], rtol=1e-12)
    np.testing.assert_allclose(job["model/params"], ref["model/params"], rtol=1e-10, atol=1e-14)
    theta = job["model/params"]
    loss, grad_norm = softmax_objective(theta, 200, 1e-3)
    np.testing.assert_allclose(job["newton/loss"][-1], loss, rtol=1e-10)
    np.testing.assert_allclose(job["newton/grad_norm"][-1], grad_norm, rtol=1e-6)
    assert job["newton/loss"][-1] < job["newton/loss"][0]


def test_a_failing_job_ends_failed(slurm, jobs):
    states = slurm.wait(jobs["failing"])
    assert states == [("FAILED", "2:0")], f"{states}\n{slurm.output(jobs['failing'])}"
    assert "invalid choice: 'biggest'" in slurm.output(jobs["failing"])


def test_a_job_warned_of_its_time_limit_saves_requeues_itself_and_ends_as_an_uninterrupted_one(slurm, jobs):
    """Slurm's time-limit warning to the batch shell (`warn`), twice: the template passes it on,
    the ranks save the state of the solve and exit with status 75, the job requeues itself, and
    it completes on its third start with the eigenpairs of the same job run uninterrupted
    (launched with mpirun), bit for bit, for one product more per stop."""
    job, checkpoint = jobs["timed"], slurm.checkpoint("timed")
    jobs["warnings"].result()
    slurm.completed(job)
    slurm.completed(jobs["reference"])
    with open(os.path.join(slurm.submit_dir, f"timed-{job}.out")) as f:
        output = f.read()  # every start's, appended (slurm.output keeps the end only)
    restarts = int(dict(f.split("=", 1) for f in slurm.run("scontrol", "-o", "show", "job", job).stdout.split()
                        if "=" in f)["Restarts"])
    stops = output.count("stopped by SIGUSR1")
    print(f"job {job}: {restarts} restarts, {stops} stops by SIGUSR1")
    assert restarts == stops == WARNINGS and output.count("requeueing job") == restarts, output
    # A stop inside a pass saves the products it had made, and the next start retraces them. (A
    # stop that lands on a pass's first product, as under a heavily loaded CI machine where the
    # first product outlasts the test's 6 s, has none to save.)
    saved = len(re.findall(r"pass\(es\) and \d+ products of the next saved to", output))
    assert output.count("products of the next, which it retraces") == saved, output
    assert "+ mpirun" in slurm.output(jobs["reference"])
    resumed, attrs = results.read(slurm.result("timed", job, "spectrum.h5"), "spectrum")
    whole, whole_attrs = results.read(slurm.result("reference", jobs["reference"], "spectrum.h5"), "spectrum")
    assert not os.path.exists(checkpoint)
    for name in ("eigenvalues", "eigenvectors", "residuals"):
        np.testing.assert_array_equal(resumed[f"spectrum/{name}"], whole[f"spectrum/{name}"], err_msg=name)
    print(f"job {job}: {attrs['n_matvecs']} products in all, {whole_attrs['n_matvecs']} uninterrupted")
    assert whole_attrs["n_matvecs"] <= attrs["n_matvecs"] <= whole_attrs["n_matvecs"] + stops <= \
        1.25 * whole_attrs["n_matvecs"]
    assert attrs["passes"] == whole_attrs["passes"]
    # and the solve itself is sound: CNN eigenpairs, largest first, small true residuals
    lam = resumed["spectrum/eigenvalues"]
    assert np.all(np.diff(lam) <= 0) and lam[0] > 0
    assert np.all(resumed["spectrum/residuals"] <= 1e-4 * abs(lam))
