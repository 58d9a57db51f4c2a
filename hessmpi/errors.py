"""The project's exception types, and how the ranks agree on an error.

Every error a user can fix (bad flag, bad file, bad data) is a HessmpiError whose
message says what was wrong and how to fix it. The scripts print it once, from the
rank that saw it, and exit with status 2 on every rank.

An error raised with `collective=True` is raised by every rank at the same point
(after a collective check, e.g. the non-finite test of every product, or a block run
under `agree`), so the scripts print it once, from rank 0, and every rank exits with
its status without aborting the MPI job.
"""


import contextlib
import traceback


class HessmpiError(Exception):
    """An error caused by the user's input; the message says how to fix it. `status` is the
    exit status a script ends with (2; 1 for an unexpected error that agree() passed on)."""

    def __init__(self, *args, collective: bool = False, status: int = 2):
        super().__init__(*args)
        self.collective = collective
        self.status = status


class DataError(HessmpiError):
    """A data file or data directory is missing, truncated or malformed."""


class ResultsError(HessmpiError):
    """A results or weights file is missing, incomplete or of the wrong shape."""


class NumericalError(HessmpiError):
    """A computation produced non-finite values or failed to converge."""


EXIT_INTERRUPTED = 75  # sysexits' EX_TEMPFAIL: stopped on request, progress saved; run again to continue


class Interrupted(HessmpiError):
    """A run stopped on request (`hessmpi.stop`: a signal) on every rank together, after saving
    what it could; the message says what was saved and where. Exit status EXIT_INTERRUPTED."""

    def __init__(self, *args, collective: bool = True, status: int = EXIT_INTERRUPTED):
        super().__init__(*args, collective=collective, status=status)


@contextlib.contextmanager
def agree(comm):
    """Run a block on every rank of comm; if it raised on any rank, every rank raises the same
    collective HessmpiError: the first failing rank's message (prefixed "[rank r]" when not
    every rank failed), status 2 for a HessmpiError and 1, with the traceback, for anything
    else. No rank is left waiting in a later collective. Collective."""
    outcome = None
    try:
        yield
    except HessmpiError as e:
        outcome = (e.status, str(e))
    except Exception:
        outcome = (1, traceback.format_exc())
    outcomes = comm.allgather(outcome)
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if failed:
        rank, (status, message) = failed[0]
        where = f"[rank {rank}] " if len(failed) < comm.Get_size() else ""
        raise HessmpiError(f"{where}{message}".rstrip(), collective=True, status=status)
