"""Stopping a long run on request, with its progress saved.

`request` marks a stop as wanted on this rank: a script's signal handler calls it on
SIGTERM or SIGUSR1 (what Slurm sends before a time limit), and any code may. Every
rank looks for requests at the same points (each product of an operator, each
training iteration) through `agreed`, one all-reduce that tells every rank whether any
rank has one; the run then raises `Interrupted` on every rank together, and whoever
holds the run's progress (a solver with a checkpoint) saves it on the way out.
"""

from __future__ import annotations

import signal

import numpy as np

from .errors import Interrupted

BY_CODE = 255  # the code of a request made by code, not by a signal (signal numbers are below)
_pending = 0  # this rank's request: a signal number, BY_CODE, or 0 for none


def request(signum: int = BY_CODE) -> None:
    """Ask the run on this rank to stop at its next collective point (safe in a signal handler)."""
    global _pending
    _pending = signum


def clear() -> None:
    """Forget a request (after the run it stopped has ended, e.g. in a notebook)."""
    global _pending
    _pending = 0


def pending() -> int:
    """This rank's request: a signal number, BY_CODE, or 0 for none."""
    return _pending


def describe(code: int) -> str:
    """'SIGTERM', 'SIGUSR1', … for a signal number; 'a stop request' otherwise."""
    try:
        return signal.Signals(code).name
    except ValueError:
        return "a stop request"


def agreed(comm, flags=()) -> tuple[int, list]:
    """(any rank's request, or 0; the maximum over the ranks of each of `flags`): one
    all-reduce, so that a check a caller makes anyway (a non-finite product) costs nothing
    more. Collective."""
    from mpi4py import MPI

    values = np.array([_pending, *flags], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, values, op=MPI.MAX)
    return int(values[0]), [int(v) for v in values[1:]]


def check(comm, where: str = "") -> None:
    """Raise Interrupted on every rank if any rank has a request. Collective."""
    code, _ = agreed(comm)
    if code:
        raise interrupted(code, where)


def interrupted(code: int, where: str = "") -> Interrupted:
    """The Interrupted of a request `code` (a signal number) seen at `where`."""
    return Interrupted(f"stopped by {describe(code)}" + (f" {where}" if where else ""))


def saved(error: Interrupted, path: str | None, how: str = "checkpoint= (--checkpoint FILE)",
          again: str = "run the same command again to continue") -> Interrupted:
    """`error` with what became of the run's progress: saved to path (`again` says how to go
    on), or lost without one (`how` says how to keep it next time)."""
    return Interrupted(f"{error}; " + (f"progress saved to {path}: {again}" if path
                                       else f"nothing saved (a checkpoint keeps the progress: {how})"))
