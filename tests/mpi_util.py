"""Helpers for tests that run at any rank count, as plain pytest or under mpirun."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys

# As in `make test`: Open MPI as root and oversubscribed, one TensorFlow thread per rank.
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_mpi_yield_when_idle": "1",
    "HESSMPI_TF_THREADS": "1",
}


def comm():
    """MPI.COMM_WORLD."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def collective_assert(ok: bool, msg: str = "") -> None:
    """Assert on every rank at once: if any rank's `ok` is false, all ranks raise,
    with the messages of the failing ranks. Every rank must call it."""
    __tracebackhide__ = True  # pytest shows the caller's line, not this helper
    verdicts = comm().allgather((bool(ok), str(msg)))
    failed = [(rank, m) for rank, (good, m) in enumerate(verdicts) if not good]
    if failed:
        lines = "\n".join(f"  rank {rank}: {m}" for rank, m in failed)
        raise AssertionError(f"failed on {len(failed)} of {len(verdicts)} ranks:\n{lines}")


def run_mpi(nprocs: int, args, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `mpirun -n nprocs <this python> *args`, capturing its output as text.

    Raises subprocess.TimeoutExpired after `timeout` seconds, once the job is gone.
    """
    cmd = ["mpirun", "-n", str(nprocs), sys.executable, *map(str, args)]
    full_env = {**os.environ, **MPI_ENV, **(env or {})}
    # A session of its own, so that on timeout the ranks can be found and ended too.
    with subprocess.Popen(cmd, env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # mpirun ends its ranks on SIGTERM
            try:
                out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                _kill_session(proc.pid)
                out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (mpirun and its ranks, which each have
    their own process group)."""
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                session = int(f.read().rsplit(")", 1)[1].split()[3])
            if session == sid:
                os.kill(int(stat.split("/")[2]), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


def descendants(pid: int) -> list[int]:
    """The pids of every process below `pid` (mpirun's ranks, for a test that kills one)."""
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
