"""Distributed symmetric operators and their arithmetic (MPI only; PETSc wraps them in petsc.py).

Every operator A of size n is a sum over the ranks: A·x = scale · Σ_ranks cᵣ(x), where
cᵣ(x) is rank r's *contribution* given the full vector x. For a curvature operator cᵣ is
the rank's sum of per-sample products and scale 1/N; for a fixed matrix (the identity,
a regularizer) it is the matrix's rows that rank owns. Vectors are split over the ranks
by `data.ownership` (PETSc's default layout): a product costs one Allgatherv of x and one
Reduce_scatter of the contributions, whatever the number of terms, so `H + gamma * R +
sigma * I` is one operator with one round of communication per product.

`A @ v` takes and returns full vectors (or n × b blocks) on every rank; `apply` and
`apply_block` work on this rank's rows (what PETSc passes); `to_petsc()` and
`to_scipy()` hand the operator to SLEPc/KSP code or to scipy.sparse.linalg.
Every product is counted (`n_matvecs`: vectors multiplied through this operator, or
through a sum or a block made of it), timed (local compute and communication) and
checked for NaN/Inf on every rank together; a stop request (`hessmpi.stop`) on any rank
then raises Interrupted on every rank, the product counted.
"""

from __future__ import annotations

import numbers
import time
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from .. import stop
from ..data.shard import ownership
from ..errors import HessmpiError, NumericalError


@runtime_checkable
class CurvatureOperator(Protocol):
    """What solvers, `petsc.shell_matrix` and the training methods need of an operator.

    - `n` (int) and `comm` (an mpi4py communicator): the operator is n × n over comm's ranks.
    - `lo`, `hi`, `n_local`: this rank's rows, PETSc's default layout of n over comm.
    - `apply_block(x_local)`: this rank's rows (n_local × b) of A·X for the block X whose rows
      this rank owns are x_local. Collective: every rank calls it for the same block.
    - `apply(x_local, y_local=None)`: the same for one vector, written into y_local if given.
    - `n_matvecs`: vectors multiplied so far.
    A must be symmetric.
    """

    n: int
    comm: object
    lo: int
    hi: int
    n_matvecs: int

    @property
    def n_local(self) -> int: ...

    def apply_block(self, x_local: np.ndarray) -> np.ndarray: ...

    def apply(self, x_local: np.ndarray, y_local: np.ndarray | None = None) -> np.ndarray: ...


class LinearOperator:
    """A symmetric n × n operator summed over the ranks of comm (module docstring).
    Subclasses give `contribution(v)` and may set `scale`."""

    scale = 1.0

    def __init__(self, n: int, comm=None):
        if comm is None:
            from .. import runtime

            comm = runtime.world()
        self.n, self.comm = int(n), comm
        self.counts, self.offsets = ownership(self.n, comm.Get_size())
        rank = comm.Get_rank()
        self.lo = int(self.offsets[rank])
        self.hi = self.lo + int(self.counts[rank])
        self.n_matvecs = 0
        self.compute_seconds = 0.0
        self.comm_seconds = 0.0
        self.on_matvec = None  # optional callback(operator) after each product
        self.problem = None  # the Problem whose curvature this is, if any

    @property
    def n_local(self) -> int:
        return self.hi - self.lo

    def contribution(self, v: np.ndarray) -> np.ndarray:
        """This rank's term of the product with the full vector v (the product is scale · the
        sum of the ranks' terms)."""
        raise NotImplementedError

    def contributions(self, block: np.ndarray) -> np.ndarray:
        """contribution() of each column of an n × b block."""
        out = np.empty_like(block)
        for j in range(block.shape[1]):
            out[:, j] = self.contribution(np.ascontiguousarray(block[:, j]))
        return out

    # ---------------------------------------------------------------- products

    def gather(self, x_local: np.ndarray) -> np.ndarray:
        """The full vector (a new array) from every rank's owned rows."""
        from mpi4py import MPI

        full = np.empty(self.n)
        self.comm.Allgatherv(np.ascontiguousarray(x_local, dtype=np.float64),
                             [full, self.counts, self.offsets, MPI.DOUBLE])
        return full

    def apply_block(self, x_local: np.ndarray) -> np.ndarray:
        """This rank's rows (n_local × b) of A·X for the block X whose rows this rank owns are
        x_local (n_local × b): one Allgatherv and one Reduce_scatter for the block. Counts b
        products and calls on_matvec once."""
        from mpi4py import MPI

        x_local = np.ascontiguousarray(x_local, dtype=np.float64)
        b = x_local.shape[1]
        t0 = time.perf_counter()
        full = np.empty((self.n, b))
        self.comm.Allgatherv(x_local, [full, self.counts * b, self.offsets * b, MPI.DOUBLE])
        t1 = time.perf_counter()
        terms = np.ascontiguousarray(self.contributions(full))
        t2 = time.perf_counter()
        y_local = np.empty((self.n_local, b))
        self.comm.Reduce_scatter(terms, y_local, recvcounts=self.counts * b, op=MPI.SUM)
        if self.scale != 1.0:
            y_local *= self.scale
        requested = self._check(y_local)
        t3 = time.perf_counter()
        self.count_products(b, t2 - t1, (t1 - t0) + (t3 - t2))
        if requested:
            raise stop.interrupted(requested, f"after {self.n_matvecs} products")
        return y_local

    def count_products(self, b: int, compute: float, comm: float) -> None:
        """Count b products and their seconds here and in every operator this one is made of
        (a sum's terms, a block's parent), calling each one's on_matvec; for products made
        outside apply_block (the error bars' group products)."""
        self.n_matvecs += b
        self.compute_seconds += compute
        self.comm_seconds += comm
        if self.on_matvec is not None:
            self.on_matvec(self)
        for inner in self._parts():
            inner.count_products(b, compute, comm)

    def _parts(self) -> list:
        return []

    def apply(self, x_local: np.ndarray, y_local: np.ndarray | None = None) -> np.ndarray:
        """y_local = this rank's rows of A·x; x_local is this rank's rows of x."""
        y = self.apply_block(np.reshape(x_local, (-1, 1)))[:, 0]
        if y_local is None:
            return y
        y_local[:] = y
        return y_local

    def apply_full(self, v: np.ndarray) -> np.ndarray:
        """A·v for a full vector v given on every rank, replicated on every rank (collective)."""
        return self.gather(self.apply(np.asarray(v, dtype=np.float64)[self.lo:self.hi]))

    def __matmul__(self, v):
        """A @ v for a full vector v or an n × b block, the result full on every rank (collective)."""
        v = np.asarray(v, dtype=np.float64)
        if v.shape[:1] != (self.n,) or v.ndim > 2:
            raise HessmpiError(f"the operator is {self.n} × {self.n}: expected a vector of {self.n} entries "
                               f"or an {self.n} × b block, got shape {v.shape}")
        if v.ndim == 1:
            return self.apply_full(v)
        y_local = self.apply_block(v[self.lo:self.hi])
        return np.column_stack([self.gather(y_local[:, j]) for j in range(v.shape[1])])

    def _check(self, y_local: np.ndarray) -> int:
        """Raise NumericalError on every rank if any rank's rows of the product hold a NaN or Inf,
        so that no rank goes on with the bad vector; else return any rank's stop request
        (`hessmpi.stop`, 0 for none). One all-reduce for both."""
        requested, (bad,) = stop.agreed(self.comm, [0 if np.isfinite(y_local).all() else 1])
        if bad:
            raise NumericalError(
                f"product {self.n_matvecs + 1} of the curvature operator is not finite (NaN or Inf): "
                f"check the weights (--weights: finite and of a sensible size?) "
                f"and try --dtype float64", collective=True)
        return requested

    # ---------------------------------------------------------------- arithmetic

    def __add__(self, other):
        if isinstance(other, numbers.Number) and other == 0:
            return self
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator([(1.0, self), (1.0, other)])

    __radd__ = __add__

    def __mul__(self, alpha):
        if not isinstance(alpha, numbers.Real):
            return NotImplemented
        return SumOperator([(float(alpha), self)])

    __rmul__ = __mul__

    def __neg__(self):
        return -1.0 * self

    def __sub__(self, other):
        return self + (-1.0) * other

    def __truediv__(self, alpha):
        return self * (1.0 / alpha)

    # ---------------------------------------------------------------- views

    def block(self, start: int, stop: int) -> "BlockOperator":
        """The diagonal block A[start:stop, start:stop] as an operator of size stop − start."""
        return BlockOperator(self, start, stop)

    def to_petsc(self):
        """A PETSc shell matrix (type python, flagged symmetric) whose products are this
        operator's, for SLEPc/KSP code of one's own. Destroy it when done."""
        from .petsc import shell_matrix

        return shell_matrix(self)

    def to_scipy(self):
        """A scipy.sparse.linalg.LinearOperator of this operator, on one rank."""
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        if self.comm.Get_size() > 1:
            raise HessmpiError(f"to_scipy() works on one rank; under mpirun ({self.comm.Get_size()} ranks) "
                               f"use to_petsc() or hessmpi's solvers")
        return ScipyOperator((self.n, self.n), matvec=self.apply_full, rmatvec=self.apply_full,
                             matmat=self.__matmul__, dtype=np.float64)


class DistributedOperator(LinearOperator):
    """scale · Σ_ranks local_product(x): each rank's local_product(v) returns its *sum* of
    per-sample products with the full vector v (scale 1/N for N samples in all).

    A curvature of a Problem also has `sample_product(v, rows)`, the sum over this rank's
    sample rows `rows` only, and `fixed_product(v)`, the part that is no sum over samples
    (the model's regularization terms), which the error bars need apart."""

    def __init__(self, local_product: Callable[[np.ndarray], np.ndarray], n: int, scale: float, comm,
                 sample_product=None, fixed_product=None):
        super().__init__(n, comm)
        self.local_product = local_product
        self.scale = float(scale)
        self.sample_product, self.fixed_product = sample_product, fixed_product

    def contribution(self, v: np.ndarray) -> np.ndarray:
        return self.local_product(v)


class MatrixOperator(LinearOperator):
    """A fixed symmetric matrix known on every rank (a numpy array, a scipy sparse matrix, or
    any object with `@`); each rank contributes the rows it owns."""

    def __init__(self, matrix, comm=None, name: str = "matrix"):
        super().__init__(matrix.shape[0], comm)
        self.rows = matrix[self.lo:self.hi]
        self.name = name

    def contribution(self, v: np.ndarray) -> np.ndarray:
        out = np.zeros(self.n)
        out[self.lo:self.hi] = self.rows @ v
        return out


class Identity(LinearOperator):
    """I of size n over comm (default MPI_COMM_WORLD): `H + sigma * Identity(H.n)`."""

    def contribution(self, v: np.ndarray) -> np.ndarray:
        out = np.zeros(self.n)
        out[self.lo:self.hi] = v[self.lo:self.hi]
        return out


class SumOperator(LinearOperator):
    """Σ_t c_t·A_t: one contribution per rank and product, one round of communication."""

    def __init__(self, terms):
        flat = []
        for c, op in terms:  # (a + b) + c is one sum of three terms
            flat += [(c * c2, op2) for c2, op2 in op.terms] if isinstance(op, SumOperator) else [(c, op)]
        sizes = {op.n for _, op in flat}
        if len(sizes) != 1:
            raise HessmpiError(f"cannot add operators of sizes {sorted(sizes)}")
        super().__init__(flat[0][1].n, flat[0][1].comm)
        self.terms = flat
        self.problem = next((op.problem for _, op in flat if op.problem is not None), None)

    def contribution(self, v: np.ndarray) -> np.ndarray:
        out = np.zeros(self.n)
        for c, op in self.terms:
            out += (c * op.scale) * op.contribution(v)
        return out

    def contributions(self, block: np.ndarray) -> np.ndarray:
        out = np.zeros_like(block)
        for c, op in self.terms:
            out += (c * op.scale) * op.contributions(block)
        return out

    def _parts(self) -> list:
        return [op for _, op in self.terms]


class BlockOperator(LinearOperator):
    """The diagonal block A[start:stop, start:stop] of A, of size stop − start.

    A product embeds x in a zero vector of A's size and keeps entries start:stop of A's
    contribution, so each costs one full local product of A (and counts as one of A's too).
    It keeps `block = slice(start, stop)`."""

    def __init__(self, parent: LinearOperator, start: int, stop: int):
        if not 0 <= start < stop <= parent.n:
            raise ValueError(f"block [{start}, {stop}) is not inside an operator of size {parent.n}")
        super().__init__(stop - start, parent.comm)
        self.parent, self.block = parent, slice(start, stop)
        self.scale = parent.scale
        self.problem = parent.problem
        self._padded = np.zeros(parent.n)
        for name in ("sample_product", "fixed_product"):
            inner = getattr(parent, name, None)
            setattr(self, name, None if inner is None else self._embedded(inner))

    def _embedded(self, product):
        def restricted(v, *args):
            self._padded[self.block] = v
            return product(self._padded, *args)[self.block]
        return restricted

    def contribution(self, v: np.ndarray) -> np.ndarray:
        self._padded[self.block] = v
        return self.parent.contribution(self._padded)[self.block]

    def _parts(self) -> list:
        return [self.parent]


def sum_over_ranks(comm, value):
    """The sum over the ranks of comm of a scalar or an array (a new array), on every rank
    (collective)."""
    from mpi4py import MPI

    if np.isscalar(value):
        return comm.allreduce(value, op=MPI.SUM)
    out = np.empty_like(value)
    comm.Allreduce(np.ascontiguousarray(value), out, op=MPI.SUM)
    return out
