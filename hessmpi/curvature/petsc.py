"""PETSc shell matrices and vectors around a distributed operator (PETSc started on first need)."""

from __future__ import annotations

import atexit
import collections
import contextlib
import hashlib
import weakref

import numpy as np

from .. import runtime
from ..errors import Interrupted

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
    """The Python context of a PETSc shell matrix whose mult is op.apply.

    Inside `interruptible` a product that raises Interrupted (a stop request) keeps it in
    `interrupted` and returns zeros, as does every later product, so that the solver
    running there ends on its own instead of being unwound from inside its C code.

    Products can be recorded (`recording`: a list of (digest of x, this rank's rows of
    H·x)) and given back (`replay`: such pairs, in order): while the vectors multiplied
    are, bit for bit on every rank, those recorded, the recorded products are returned
    instead of being computed (and not counted). A solve started again from the same
    state then retraces, for free, the steps of one that was interrupted."""

    def __init__(self, op):
        self.op = op
        self.solving = False
        self.interrupted = None
        self.recording = None
        self.replay = collections.deque()

    def mult(self, mat, x, y):
        if self.interrupted is not None:
            y.zeroEntries()
            return
        x_local = x.getArray(readonly=True)
        digest = _digest(x_local) if self.recording is not None or self.replay else b""
        if self.replay and self._replayed(digest):
            y.getArray()[:] = self.replay.popleft()[1]
        else:
            try:
                self.op.apply(x_local, y.getArray())
            except Interrupted as e:
                if not self.solving:
                    raise
                # Without its traceback, which holds PETSc's vectors of this call: kept alive
                # past PETSc's finalization they crash the interpreter at exit.
                self.interrupted = e.with_traceback(None)
                y.zeroEntries()
                return
        if self.recording is not None:
            self.recording.append((digest, y.getArray(readonly=True).copy()))

    def _replayed(self, digest: bytes) -> bool:
        """Whether the next recorded product is that of this x on every rank (else the replay
        ends, on every rank). Collective."""
        from mpi4py import MPI

        if self.op.comm.allreduce(int(digest != self.replay[0][0]), op=MPI.MAX):
            self.replay.clear()
            return False
        return True

    def multTranspose(self, mat, x, y):  # symmetric
        self.mult(mat, x, y)


def shell_context(mat) -> ShellContext | None:
    """The ShellContext of a matrix made by `shell_matrix`, None for any other."""
    ctx = mat.getPythonContext() if mat.getType() == "python" else None
    return ctx if isinstance(ctx, ShellContext) else None


@contextlib.contextmanager
def interruptible(mat):
    """Run a PETSc or SLEPc solve with the shell matrix mat (from `shell_matrix`) so that a stop
    request ends it cleanly: its products turn to zeros (see ShellContext), the solver
    returns, with a meaningless result, and Interrupted is raised on leaving the block.
    Yields the ShellContext (None for another matrix), whose `interrupted` a solver's
    monitor may look at. Why: an exception unwinding through PETSc's C code leaves the
    solver's objects half-used (basis columns and arrays checked out), and they then
    cannot even be destroyed."""
    ctx = shell_context(mat)
    if ctx is None:
        yield None
        return
    ctx.solving, ctx.interrupted = True, None
    try:
        yield ctx
    finally:
        ctx.solving = False
    if ctx.interrupted is not None:
        error, ctx.interrupted = ctx.interrupted, None
        try:
            raise error
        finally:
            del error  # no reference cycle through this frame


def replay(mat, products) -> None:
    """Give the shell matrix mat products to retrace (see ShellContext): those that a
    `retraceable` unit of work had made when it was interrupted; any other matrix ignores them."""
    shell = shell_context(mat)
    if shell is not None:
        shell.replay.extend(products)


@contextlib.contextmanager
def retraceable(mat, on_interrupt=None):
    """A unit of work (a solver's pass, a Lanczos run) whose products with the shell matrix mat are
    recorded when on_interrupt is given: if a stop request interrupts it, on_interrupt(products)
    receives them, in order, before Interrupted goes on. Given back through `replay` to the
    same work started again from the same state, they are retraced instead of computed.
    Products left to retrace are dropped when the unit ends."""
    shell = shell_context(mat)
    if shell is not None and on_interrupt is not None:
        shell.recording = []
    try:
        yield
    except Interrupted:
        if on_interrupt is not None:
            on_interrupt(list(shell.recording or ()) if shell is not None else [])
        raise
    finally:
        if shell is not None:
            shell.recording = None
            shell.replay.clear()


def _digest(x_local: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(x_local).tobytes(), digest_size=16).digest()


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
