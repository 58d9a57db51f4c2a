"""The one split of n rows (samples, or the entries of a vector) over the ranks.

Contiguous blocks in rank order, the first n mod size ranks one longer: PETSc's
default layout of a vector, and the rows each rank holds of the training samples.
"""

from __future__ import annotations

import numpy as np


def ownership(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts, offsets) of n rows over size ranks (int64 arrays of length size)."""
    if n < 0 or size < 1:
        raise ValueError(f"ownership needs n >= 0 and size >= 1; got {n}, {size}")
    counts = np.full(size, n // size, dtype=np.int64)
    counts[: n % size] += 1
    offsets = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    return counts, offsets


def shard_range(n: int, size: int, rank: int) -> tuple[int, int]:
    """The half-open row range [start, stop) of `rank` among `size` ranks over n rows.

    Raises ValueError unless n >= 0, size >= 1 and 0 <= rank < size.
    """
    if not 0 <= rank < max(size, 0):
        raise ValueError(f"shard_range needs 0 <= rank < size; got rank {rank} of {size}")
    counts, offsets = ownership(n, size)
    return int(offsets[rank]), int(offsets[rank] + counts[rank])
