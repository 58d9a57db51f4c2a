"""The error policy of the scripts: one message for an error every rank sees, no hang when one rank fails.

Set-up runs on every rank inside `all_ranks`, which gathers every rank's outcome, so a
bad flag or file gives one message from rank 0 and exit status 2 on every rank. After
set-up (`main_guard`), an exception on any rank prints that rank's message and aborts
the whole MPI job, so no rank is left waiting in a collective; an error raised by every
rank at once (`HessmpiError(collective=True)`: a non-finite product, a diverged run)
prints once and exits with status 2 everywhere. SIGTERM and SIGUSR1 stop the run at
its next product or iteration on every rank together (`hessmpi.stop`); it saves its
progress and exits with status 75 (EXIT_INTERRUPTED).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback

from .. import runtime, stop
from ..errors import HessmpiError, agree
from . import petsc_options


@contextlib.contextmanager
def all_ranks(comm, exit: bool = True):
    """Run a block on every rank; if it raised anywhere, every rank exits with one message.

    A HessmpiError exits with status 2 and its message; any other exception with
    status 1 and its traceback. Rank 0 prints the first failing rank's message.
    With exit=False every rank raises instead the same collective HessmpiError holding
    that message (errors.agree), for a caller that is itself inside all_ranks (or a test).
    """
    try:
        with agree(comm):
            yield
    except HessmpiError as e:
        if not exit:
            raise
        if comm.Get_rank() == 0:
            print(f"{'error: ' if e.status == 2 else ''}{e}".rstrip(), file=sys.stderr, flush=True)
        raise SystemExit(e.status)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def stop_on_signals() -> None:
    """Make SIGTERM and SIGUSR1 (Slurm's time-limit signal and the usual warning signal) a stop
    request (`hessmpi.stop`): the run saves its progress at its next product or iteration
    and exits with status EXIT_INTERRUPTED on every rank."""
    def handler(signum, frame):
        if stop.pending() == 0:
            runtime.say(f"{signal.Signals(signum).name}: stopping at the next product or iteration, "
                        "saving progress")
        stop.request(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def main_guard(main) -> None:
    """Run main() with the error policy and `stop_on_signals`: an exception outside `all_ranks`
    aborts the job, except a collective HessmpiError (raised by every rank at once, e.g. a
    non-finite product, or Interrupted): rank 0 prints it and every rank exits with its
    status (2; EXIT_INTERRUPTED for a stop)."""
    comm = None
    try:
        comm = runtime.world()
        stop_on_signals()
        main()
        petsc_options.run_finished()
    except SystemExit:
        raise
    except BaseException as e:
        rank = comm.Get_rank() if comm is not None else 0
        size = comm.Get_size() if comm is not None else 1
        if isinstance(e, HessmpiError) and e.collective:  # every rank raised it: one message, no abort
            if rank == 0:
                print(f"{'error: ' if e.status == 2 else ''}{e}".rstrip(), file=sys.stderr, flush=True)
            sys.stdout.flush()
            comm.Barrier()
            # At once: PETSc's finalization would trip over the state the error left a
            # solver in (e.g. an EPS interrupted mid-iteration) and print its traceback.
            os._exit(e.status)
        if isinstance(e, HessmpiError):
            text, code = f"error: {e}", 2
        elif isinstance(e, KeyboardInterrupt):
            text, code = "interrupted", 130
        else:
            text, code = traceback.format_exc().rstrip(), 1
        prefix = f"[rank {rank}] " if size > 1 else ""
        print(f"{prefix}{text}", file=sys.stderr, flush=True)
        if size > 1:
            comm.Abort(code)
        raise SystemExit(code)
    exit_now(0)


def exit_now(status: int) -> None:
    """End the process with `status` once the exit handlers have run (PETSc's finalization,
    its report of unused options) and MPI is finalized, without the interpreter's teardown:
    unloading TensorFlow's modules takes about a second per process (measured), after
    every result is written. Under a profiler or tracer (cProfile, coverage), which write
    their files in that teardown, return instead."""
    import atexit
    import ctypes

    from mpi4py import MPI

    if _observed():
        return
    for signum in STOP_SIGNALS:  # the run is over: a stop request now has nothing to stop
        signal.signal(signum, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()  # hessmpi's own first: they set what PetscFinalize reports
    sys.stdout.flush()
    sys.stderr.flush()
    petsc = sys.modules.get("petsc4py.PETSc")
    if petsc is not None and not petsc.Sys.isFinalized():
        petsc._finalize()  # what petsc4py does at exit (Py_AtExit, which os._exit skips)
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    ctypes.CDLL(None).fflush(None)  # what PETSc printed through C's stdio
    os._exit(status)


def _observed() -> bool:
    """Whether a profiler, tracer or debugger watches this process (sys.setprofile/settrace,
    or, from Python 3.12, a sys.monitoring tool such as cProfile's)."""
    monitoring = getattr(sys, "monitoring", None)
    tools = [monitoring.get_tool(i) for i in range(6)] if monitoring is not None else []
    return sys.getprofile() is not None or sys.gettrace() is not None or any(tools)
