"""PETSc shell matrices and vectors around a DistributedOperator.

Import this module only after `petsc4py.init(argv)` has been called by the script
that wants PETSc options from its command line (the scripts do it via `cli`).
"""

from __future__ import annotations

import atexit
import weakref

import numpy as np
from petsc4py import PETSc

_shells: list = []  # weak references (PETSc objects are unhashable, so no WeakSet)


@atexit.register
def _destroy_shells():
    # A shell matrix whose Python context is freed after PetscFinalize crashes the
    # interpreter at exit; destroy the live ones while PETSc is still up.
    for ref in _shells:
        mat = ref()
        if mat is not None:
            mat.destroy()


class ShellContext:
    """The Python context of a PETSc shell matrix whose mult is op.apply."""

    def __init__(self, op):
        self.op = op

    def mult(self, mat, x, y):
        self.op.apply(x.getArray(readonly=True), y.getArray())

    def multTranspose(self, mat, x, y):  # symmetric
        self.mult(mat, x, y)


def shell_matrix(op) -> PETSc.Mat:
    """A symmetric PETSc shell matrix (type python) whose products are op.apply.

    op is duck-typed (a DistributedOperator, training.RegularizedOperator, …); it must provide:

    - `n` (int): the global size; the matrix is n × n.
    - `n_local` (int) and `comm` (an mpi4py communicator): this rank's number of rows and
      the communicator of the matrix. The row blocks must be PETSc's default layout for n
      on comm (contiguous, the first n mod size ranks one longer: `operator.ownership`),
      since vectors from `mat.createVecs()` get that layout.
    - `apply(x_local, y_local)`: write into y_local (a float64 array of n_local entries,
      PETSc's own memory, to be filled in place) this rank's block of A·x, where x_local
      is this rank's block of x (read-only). Collective: every rank of comm calls it for
      the same product, so it may communicate.

    A must be symmetric (the matrix is flagged SYMMETRIC and multTranspose is mult).
    Products are not counted here; op counts its own (e.g. `n_matvecs`).
    """
    sizes = ((op.n_local, op.n), (op.n_local, op.n))
    mat = PETSc.Mat().createPython(sizes, ShellContext(op), comm=op.comm)
    mat.setOption(PETSc.Mat.Option.SYMMETRIC, True)
    mat.setUp()
    _shells.append(weakref.ref(mat))
    return mat


def vec_from_full(mat: PETSc.Mat, full: np.ndarray) -> PETSc.Vec:
    """A vector laid out like mat's columns holding this rank's block of a full array."""
    v = mat.createVecRight()
    lo, hi = v.getOwnershipRange()
    v.getArray()[:] = full[lo:hi]
    return v


def vec_to_full(v: PETSc.Vec, comm) -> np.ndarray:
    """The whole vector on every rank."""
    return np.concatenate(comm.allgather(v.getArray(readonly=True).copy()))
