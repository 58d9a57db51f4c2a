"""The distributed curvature operator: shard products summed over ranks (MPI only).

Every rank holds the full parameter vector and its own shard of the data. A product
y = (1/N) Σ_shards H_shard·x with x and y split over ranks by `ownership` costs one
Allgatherv of x and one Reduce_scatter of the local products. PETSc is not needed
here, so the MPI sum can be tested on its own; `petsc.py` wraps it as a shell matrix.
`restrict` makes the operator of one diagonal block, e.g. one layer's (`layer_block`).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
from mpi4py import MPI

from .errors import HessmpiError, NumericalError


def ownership(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts, offsets) of a length-n vector split in contiguous blocks over size ranks,
    the first n % size ranks holding one extra entry (PETSc's default layout)."""
    counts = np.full(size, n // size, dtype=np.int64)
    counts[: n % size] += 1
    offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return counts, offsets


class DistributedOperator:
    """y = (scale) Σ_ranks local_product(x): a symmetric operator over all ranks' shards.

    local_product(v) must return this rank's *sum* of per-sample products with the full
    vector v; scale is 1/N for N samples in all shards. The operator counts its
    products in `n_matvecs` (one per vector, whatever the call) and the seconds spent
    in local compute and in communication.
    """

    def __init__(self, local_product: Callable[[np.ndarray], np.ndarray], n: int,
                 scale: float, comm: MPI.Comm):
        self.local_product = local_product
        self.n = n
        self.scale = scale
        self.comm = comm
        self.counts, self.offsets = ownership(n, comm.Get_size())
        rank = comm.Get_rank()
        self.lo = int(self.offsets[rank])
        self.hi = self.lo + int(self.counts[rank])
        self._full = np.empty(n)
        self.n_matvecs = 0
        self.compute_seconds = 0.0
        self.comm_seconds = 0.0
        self.on_matvec = None  # optional callback(operator) after each product

    @property
    def n_local(self) -> int:
        return self.hi - self.lo

    def gather(self, x_local: np.ndarray) -> np.ndarray:
        """The full vector from every rank's owned block (a buffer reused across calls)."""
        self.comm.Allgatherv(np.ascontiguousarray(x_local, dtype=np.float64),
                             [self._full, self.counts, self.offsets, MPI.DOUBLE])
        return self._full

    def apply(self, x_local: np.ndarray, y_local: np.ndarray | None = None) -> np.ndarray:
        """y_local = owned block of (scale · Σ_ranks H_rank·x); x_local is the owned block of x."""
        y = self.apply_block(np.reshape(x_local, (-1, 1)))[:, 0]
        if y_local is None:
            return y
        y_local[:] = y
        return y_local

    def apply_block(self, x_local: np.ndarray) -> np.ndarray:
        """This rank's rows (n_local × b) of scale · Σ_ranks H_rank·X for a block X of b
        vectors given by this rank's rows x_local (n_local × b): the products of apply,
        with one Allgatherv and one Reduce_scatter for the whole block. Counts b products
        and calls on_matvec once."""
        x_local = np.ascontiguousarray(x_local, dtype=np.float64)
        b = x_local.shape[1]
        t0 = time.perf_counter()
        full = np.empty((self.n, b))
        self.comm.Allgatherv(x_local, [full, self.counts * b, self.offsets * b, MPI.DOUBLE])
        t1 = time.perf_counter()
        prod = np.empty((self.n, b))
        for j in range(b):
            prod[:, j] = self.local_product(np.ascontiguousarray(full[:, j]))
        t2 = time.perf_counter()
        y_local = np.empty((self.n_local, b))
        self.comm.Reduce_scatter(prod, y_local, recvcounts=self.counts * b, op=MPI.SUM)
        y_local *= self.scale
        self._check_finite(y_local)
        t3 = time.perf_counter()
        self.compute_seconds += t2 - t1
        self.comm_seconds += (t1 - t0) + (t3 - t2)
        self.n_matvecs += b
        if self.on_matvec is not None:
            self.on_matvec(self)
        return y_local

    def _check_finite(self, y_local: np.ndarray) -> None:
        """Raise NumericalError on every rank (one flag allreduced) if any rank's block of
        the product holds a NaN or Inf, so that no rank goes on with the bad vector."""
        bad = np.array([0 if np.isfinite(y_local).all() else 1], dtype=np.int32)
        self.comm.Allreduce(MPI.IN_PLACE, bad, op=MPI.MAX)
        if bad[0]:
            raise NumericalError(
                f"product {self.n_matvecs + 1} of the curvature operator is not finite (NaN or Inf): "
                f"check the weights (--weights: finite and of a sensible size?) "
                f"and try --dtype float64", collective=True)

    def apply_full(self, v: np.ndarray) -> np.ndarray:
        """The full product (replicated on every rank) for a full vector v given on every rank."""
        y = self.apply(np.asarray(v, dtype=np.float64)[self.lo:self.hi])
        out = np.empty(self.n)
        self.comm.Allgatherv(y, [out, self.counts, self.offsets, MPI.DOUBLE])
        return out


def sum_over_ranks(comm: MPI.Comm, value):
    """The sum over the ranks of comm of a scalar or an array (a new array), on every rank
    (collective)."""
    if np.isscalar(value):
        return comm.allreduce(value, op=MPI.SUM)
    out = np.empty_like(value)
    comm.Allreduce(np.ascontiguousarray(value), out, op=MPI.SUM)
    return out


def hessian_operator(curvature, n_global: int, comm: MPI.Comm) -> DistributedOperator:
    """The mean-loss Hessian over all ranks' shards: (1/n_global) Σ_shards H_shard."""
    return DistributedOperator(curvature.hvp, curvature.n_params, 1.0 / n_global, comm)


def ggn_operator(curvature, n_global: int, comm: MPI.Comm) -> DistributedOperator:
    """The mean-loss generalized Gauss-Newton matrix over all ranks' shards:
    (1/n_global) Σ_shards Σᵢ Jᵢᵀ(∇²_z ℓᵢ)Jᵢ, symmetric positive semi-definite."""
    return DistributedOperator(curvature.ggn, curvature.n_params, 1.0 / n_global, comm)


def restrict(op: DistributedOperator, start: int, stop: int) -> DistributedOperator:
    """The diagonal block op[start:stop, start:stop] as an operator of size stop − start.

    Its products embed x in a zero vector of op's size, apply op's local product and
    keep entries start:stop, so each costs one full local product of op. It counts
    its own products (op's counter does not move) and keeps `block = slice(start, stop)`.
    """
    if not 0 <= start < stop <= op.n:
        raise ValueError(f"block [{start}, {stop}) is not inside an operator of size {op.n}")
    padded = np.zeros(op.n)

    def local_product(v_block):
        padded[start:stop] = v_block
        return op.local_product(padded)[start:stop]

    block = DistributedOperator(local_product, stop - start, op.scale, op.comm)
    block.block = slice(start, stop)
    return block


def layer_names(model) -> list[str]:
    """The names `--layer` accepts: each layer (its tensors together, e.g. 'conv1') and
    each tensor of model.layout ('conv1/kernel', 'conv1/bias'), in θ order."""
    names = []
    for t in model.layout:
        layer = t.name.split("/")[0]
        if "/" in t.name and layer not in names:
            names.append(layer)
        names.append(t.name)
    return names


def layer_block(model, name: str) -> slice:
    """The slice of θ holding layer or tensor `name` (see layer_names); HessmpiError
    listing the valid names if there is no such layer."""
    tensors = [t for t in model.layout if t.name == name or t.name.split("/")[0] == name]
    if not tensors:
        raise HessmpiError(f"{model.name} has no layer {name!r}: choose one of "
                           f"{', '.join(layer_names(model))}")
    start = min(t.offset for t in tensors)
    stop = max(t.offset + t.size for t in tensors)
    return slice(start, stop)
