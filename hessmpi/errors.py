"""The project's exception types.

Every error a user can fix (bad flag, bad file, bad data) is a HessmpiError whose
message says what was wrong and how to fix it. The scripts print it once, from the
rank that saw it, and exit with status 2 on every rank.
"""


class HessmpiError(Exception):
    """An error caused by the user's input; the message says how to fix it."""


class DataError(HessmpiError):
    """A data file or data directory is missing, truncated or malformed."""


class ResultsError(HessmpiError):
    """A results or weights file is missing, incomplete or of the wrong shape."""


class NumericalError(HessmpiError):
    """A computation produced non-finite values or failed to converge."""
