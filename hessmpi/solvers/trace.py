"""Trace and Frobenius norm of a distributed symmetric operator, with standard errors.

- Hutchinson: tr(H) = E[zᵀHz] and ‖H‖²_F = tr(H²) = E[‖Hz‖²] for a random z with
  E[zzᵀ] = I (Rademacher or Gaussian entries); one product per probe gives a sample
  of both. The standard error is the sample standard deviation over the P probes
  divided by √P (NaN for one probe). Rademacher probes have the smaller variance:
  Var(zᵀHz) = 2(‖H‖²_F − Σᵢ Hᵢᵢ²), against 2‖H‖²_F for Gaussian ones.
- The same samples come free with stochastic Lanczos quadrature: for v = z/‖z‖ the
  first Lanczos step gives α₁ = vᵀHv and β₁² = ‖Hv‖² − α₁², so n·α₁ and n·(α₁² + β₁²)
  are exactly the Hutchinson samples when ‖z‖² = n (Rademacher), and unbiased too
  for normalised Gaussian probes (v is then uniform on the sphere, E[vvᵀ] = I/n).
- Hutch++ (Meyer, Musco, Musco & Woodruff 2021) spends m products in thirds: a
  sketch Q = orth(H S) of k = m/3 columns, the exact tr(QᵀHQ), and Hutchinson with k
  probes on the deflated (I − QQᵀ)H(I − QQᵀ). Its standard error is the Hutchinson
  error of that deflated part given Q. Large outlying eigenvalues, the usual case
  for a Hessian, are caught by the sketch, so the error is much smaller for the
  same number of products.

The orthogonalizations use SLEPc's BV (distributed vectors). Probes come from
`slq.probe` with their own streams, so the rank count never changes a result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import runtime
from .slq import Quadrature, Stat, probe

HUTCHINSON_STREAM = 0  # the SLQ probes: hutchinson() and SLQ give the same samples
SKETCH_STREAM, DEFLATED_STREAM = 1, 2


@dataclass
class TraceEstimates:
    """Trace and ‖·‖²_F estimates with their standard errors, and what they cost."""

    trace: Stat
    frobenius_sq: Stat
    n_matvecs: int = 0

    @property
    def frobenius(self) -> Stat:
        """‖H‖_F = √(‖H‖²_F), its standard error by the delta method: se(‖H‖²_F) / (2‖H‖_F)."""
        value = math.sqrt(max(self.frobenius_sq.value, 0.0))
        return Stat(value, self.frobenius_sq.stderr / (2 * value) if value > 0 else float("nan"))


def from_quadrature(q: Quadrature) -> TraceEstimates:
    """Hutchinson estimates of tr(H) and ‖H‖²_F from the first Lanczos step of each SLQ probe
    (no further products)."""
    first_alpha = q.alphas[:, 0]
    first_beta = np.where(q.steps > 1, q.betas[:, 0] if q.betas.shape[1] else 0.0, 0.0)
    return TraceEstimates(Stat.of(q.n * first_alpha), Stat.of(q.n * (first_alpha ** 2 + first_beta ** 2)))


def hutchinson(mat, n_probes: int, seed: int = 0, distribution: str = "rademacher") -> TraceEstimates:
    """Hutchinson's estimates of tr(H) and ‖H‖²_F from n_probes products. Collective."""
    n = mat.getSize()[0]
    lo, hi = mat.getOwnershipRange()
    x, y = mat.createVecs()
    traces, squares = [], []
    try:
        for p in range(n_probes):
            x.getArray()[:] = probe(n, seed, p, distribution, HUTCHINSON_STREAM)[lo:hi]
            mat.mult(x, y)
            traces.append(x.dot(y))
            squares.append(y.dot(y))
    finally:
        x.destroy()
        y.destroy()
    return TraceEstimates(Stat.of(traces), Stat.of(squares), n_probes)


@dataclass
class HutchPP:
    """A Hutch++ trace estimate: tr(QᵀHQ) + a Hutchinson estimate of the deflated rest."""

    trace: Stat
    sketch_trace: float
    sketch_rank: int
    deflated: Stat
    n_matvecs: int


def hutchpp(mat, n_matvecs: int, seed: int = 0, distribution: str = "rademacher",
            prefix: str = "trace_") -> HutchPP:
    """The Hutch++ trace of mat with at most n_matvecs products (k = n_matvecs // 3 ≥ 1 of
    each kind). Sketch columns that add nothing new (H of low rank) are dropped, which
    saves their products in the exact part. Collective."""
    SLEPc = runtime.slepc()

    k = n_matvecs // 3
    if k < 1:
        raise ValueError(f"Hutch++ needs at least 3 products, got {n_matvecs}")
    n = mat.getSize()[0]
    k = min(k, n)
    lo, hi = mat.getOwnershipRange()
    x, y = mat.createVecs()
    bv = SLEPc.BV().create(comm=mat.getComm())
    bv.setSizesFromVec(x, k)
    bv.setOptionsPrefix(prefix)
    bv.setFromOptions()
    used = 0
    try:
        rank = 0
        for i in range(k):  # Q = orth(H S)
            x.getArray()[:] = probe(n, seed, i, distribution, SKETCH_STREAM)[lo:hi]
            mat.mult(x, y)
            used += 1
            size = y.norm()
            bv.setActiveColumns(0, rank)
            norm, lindep = bv.orthogonalizeVec(y) if rank else (size, False)
            if size == 0 or lindep or norm <= 1e-10 * size:
                continue
            y.scale(1.0 / norm)
            bv.insertVec(rank, y)
            rank += 1
        sketch = 0.0
        for j in range(rank):  # tr(QᵀHQ)
            q = bv.getColumn(j)
            try:
                mat.mult(q, y)
                sketch += y.dot(q)
            finally:
                bv.restoreColumn(j, q)
            used += 1
        bv.setActiveColumns(0, rank)
        samples = []
        for i in range(k):  # Hutchinson on (I − QQᵀ)H(I − QQᵀ)
            x.getArray()[:] = probe(n, seed, i, distribution, DEFLATED_STREAM)[lo:hi]
            if rank:
                bv.orthogonalizeVec(x)
            mat.mult(x, y)
            used += 1
            samples.append(x.dot(y))
    finally:
        bv.destroy()
        x.destroy()
        y.destroy()
    deflated = Stat.of(samples)
    return HutchPP(Stat(sketch + deflated.value, deflated.stderr), sketch, rank, deflated, used)


@dataclass
class Trace:
    """A trace estimate with its standard error and what it cost."""

    value: float
    stderr: float
    method: str
    n_matvecs: int

    def __repr__(self):
        return f"Trace({self.value:.6g} ± {self.stderr:.2g}, {self.method}, {self.n_matvecs} products)"


METHODS = ("hutch++", "hutchinson")


def estimate(op, products: int = 30, method: str = "hutch++", seed: int = 0,
             distribution: str = "rademacher") -> Trace:
    """tr(op) from at most `products` products, by Hutch++ (default) or Hutchinson. Collective."""
    from ..curvature.petsc import shell_matrix
    from ..errors import HessmpiError

    if method not in METHODS:
        raise HessmpiError(f"unknown trace method {method!r}: choose one of {', '.join(METHODS)}")
    if products < (3 if method == "hutch++" else 1):
        raise HessmpiError(f"{method} needs at least {3 if method == 'hutch++' else 1} products, got {products}")
    mat = shell_matrix(op)
    try:
        if method == "hutch++":
            pp = hutchpp(mat, products, seed, distribution)
            return Trace(pp.trace.value, pp.trace.stderr, method, pp.n_matvecs)
        est = hutchinson(mat, products, seed, distribution)
        return Trace(est.trace.value, est.trace.stderr, method, est.n_matvecs)
    finally:
        mat.destroy()
