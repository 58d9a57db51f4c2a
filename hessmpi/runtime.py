"""Process-level set-up shared by every script: MPI, TensorFlow threads, log noise.

Import this module before TensorFlow: it quiets TensorFlow's start-up messages, and
`configure_threads` must run before TensorFlow creates its thread pools.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def world():
    """MPI_COMM_WORLD (mpi4py)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def ranks_on_this_node(comm) -> int:
    """How many ranks of comm share this node's memory."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_size()
    finally:
        node.Free()


def default_threads(comm) -> int:
    """TensorFlow threads per rank: this node's cores divided among its ranks, at least 1.

    HESSMPI_TF_THREADS overrides it (a SLURM job sets it from --cpus-per-task).
    """
    if os.environ.get("HESSMPI_TF_THREADS"):
        return max(1, int(os.environ["HESSMPI_TF_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // ranks_on_this_node(comm))


def import_tensorflow():
    """Import TensorFlow with its start-up log lines (absl, oneDNN) kept off stderr.

    The file descriptor is silenced only for the import; an import failure still
    raises its Python exception as usual.
    """
    import sys

    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tf


_configured = None


def configure_threads(threads: int) -> int:
    """Give TensorFlow `threads` intra-op and inter-op threads; returns the count in force.

    TensorFlow fixes its pools on first use, so only the first call has an effect.
    """
    global _configured
    if _configured is None:
        tf = import_tensorflow()

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
            _configured = threads
        except RuntimeError:  # TensorFlow already initialised by the caller
            _configured = tf.config.threading.get_intra_op_parallelism_threads() or threads
    return _configured
