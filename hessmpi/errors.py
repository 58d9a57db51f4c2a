"""The project's exception types.

Every error a user can fix (bad flag, bad file, bad data) is a HessmpiError whose
message says what was wrong and how to fix it. The scripts print it once, from the
rank that saw it, and exit with status 2 on every rank.

An error raised with `collective=True` is raised by every rank at the same point
(after a collective check, e.g. the non-finite test of every product), so the
scripts print it once, from rank 0, and every rank exits with status 2 without
aborting the MPI job.
"""


class HessmpiError(Exception):
    """An error caused by the user's input; the message says how to fix it."""

    def __init__(self, *args, collective: bool = False):
        super().__init__(*args)
        self.collective = collective


class DataError(HessmpiError):
    """A data file or data directory is missing, truncated or malformed."""


class ResultsError(HessmpiError):
    """A results or weights file is missing, incomplete or of the wrong shape."""


class NumericalError(HessmpiError):
    """A computation produced non-finite values or failed to converge."""
