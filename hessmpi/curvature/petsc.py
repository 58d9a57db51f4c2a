"""PETSc shell matrices and vectors around a distributed operator (PETSc started on first need)."""

from __future__ import annotations

import atexit
import weakref

import numpy as np

from .. import runtime

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


def shell_matrix(op):
    """A symmetric PETSc shell matrix (type python) whose products are op.apply.

    op is an `operator.CurvatureOperator`: its row blocks are PETSc's default layout for
    n on op.comm (`data.ownership`), which vectors from `mat.createVecs()` get, and its
    `apply(x_local, y_local)` fills y_local (PETSc's own memory) in place. It must be
    symmetric (the matrix is flagged SYMMETRIC and multTranspose is mult). Products are
    not counted here; op counts its own (`n_matvecs`).
    """
    PETSc = runtime.petsc()
    sizes = ((op.n_local, op.n), (op.n_local, op.n))
    mat = PETSc.Mat().createPython(sizes, ShellContext(op), comm=op.comm)
    mat.setOption(PETSc.Mat.Option.SYMMETRIC, True)
    mat.setUp()
    _shells.append(weakref.ref(mat))
    return mat


def vec_from_full(mat, full: np.ndarray):
    """A vector laid out like mat's columns holding this rank's block of a full array."""
    v = mat.createVecRight()
    lo, hi = v.getOwnershipRange()
    v.getArray()[:] = full[lo:hi]
    return v


def vec_to_full(v, comm) -> np.ndarray:
    """The whole vector on every rank."""
    return np.concatenate(comm.allgather(v.getArray(readonly=True).copy()))
