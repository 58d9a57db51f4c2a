"""The process's numerical stack, started on first need: MPI, TensorFlow (its threads), PETSc/SLEPc.

Importing hessmpi starts none of them. TensorFlow is imported quietly (its start-up log
lines kept off stderr) and given this rank's share of the node's cores as threads, at
its first use by hessmpi; PETSc and SLEPc are initialised at their first use, or by
`init_petsc(options)` with command-line options (which may also come after that first
use: they are then added to PETSc's options database).
"""

from __future__ import annotations

import os
import sys


def world():
    """MPI_COMM_WORLD (mpi4py): one process is a world of one rank."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def rank() -> int:
    """This process's rank in MPI_COMM_WORLD; 0 if it has not started MPI (a plain process,
    such as scripts/compare.py, never needs to)."""
    return world().Get_rank() if "mpi4py.MPI" in sys.modules else 0


def say(*parts) -> None:
    """Print on rank 0 of MPI_COMM_WORLD only, flushed (progress of long runs)."""
    if rank() == 0:
        print(*parts, flush=True)


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


_threads = None


def import_tensorflow():
    """TensorFlow, imported on first call with its start-up log lines (absl, oneDNN) kept off
    stderr and its threads set to `default_threads` (unless configure_threads came first or
    TensorFlow was already running). An import failure raises as usual."""
    if "tensorflow" in sys.modules:
        tf = sys.modules["tensorflow"]
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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
    if _threads is None:
        configure_threads(default_threads(world()))
    return tf


def import_keras():
    """Keras (3), imported after TensorFlow (import_tensorflow: quiet, threads set)."""
    import_tensorflow()
    import keras

    return keras


def threads() -> int:
    """TensorFlow's threads per rank (importing TensorFlow, which sets them, if need be)."""
    import_tensorflow()
    return _threads


def configure_threads(threads: int) -> int:
    """Give TensorFlow `threads` intra-op and inter-op threads; returns the count in force.

    TensorFlow fixes its pools on first use, so only the first call has an effect.
    """
    global _threads
    if _threads is None:
        _threads = threads  # before the import below, which calls back here otherwise
        tf = import_tensorflow()
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # TensorFlow already initialised by the caller
            _threads = tf.config.threading.get_intra_op_parallelism_threads() or threads
    return _threads


def init_petsc(options: list[str] | None = None) -> None:
    """Start PETSc and SLEPc (once) with these options (e.g. ['-hess_eps_monitor']); if they
    already run, add the options to PETSc's database."""
    world()  # MPI first: mpi4py initialises it and finalises it after PETSc
    import petsc4py

    options = list(options or [])
    program = sys.argv[0] if sys.argv and sys.argv[0] else "hessmpi"
    if "petsc4py.PETSc" in sys.modules:  # started (importing PETSc starts it)
        if options:
            from petsc4py import PETSc

            PETSc.Options().insertString(" ".join(options))
    else:
        petsc4py.init([program] + options)
    if "slepc4py.SLEPc" not in sys.modules:
        import slepc4py

        slepc4py.init([program] + options)


def petsc():
    """petsc4py.PETSc, PETSc started if it was not."""
    init_petsc()
    from petsc4py import PETSc

    return PETSc


def slepc():
    """slepc4py.SLEPc, SLEPc started if it was not."""
    init_petsc()
    from slepc4py import SLEPc

    return SLEPc
