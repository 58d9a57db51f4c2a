"""Numerical rank of the Hessian of a batch, by two independent routes.

The rank is the number of eigenvalues with |λ| > tol·max|λ|. Default tolerance
(`default_tol`): tol = n·ε, with n the matrix size and ε the machine epsilon of the
arithmetic that produced the eigenvalues — float64 for the dense route, `--dtype`
for the matrix-free one (numpy's `matrix_rank` rule, LAPACK's convention).

Dense route (exact, every eigenvalue from LAPACK):

- softmax regression: the loss is a function of the logits z = Wᵀx, which are linear
  in θ, so H = (1/n) Σᵢ xᵢxᵢᵀ ⊗ Aᵢ exactly, Aᵢ = diag(pᵢ) − pᵢpᵢᵀ (θ index pixel·C +
  class). Every Aᵢ annihilates 1 (the shift invariance), so H lives on
  R^pixels ⊗ 1^⊥ and is assembled there, on the live pixels only (a pixel that is
  zero in every image gives exact zero rows): the (live·(C−1))² matrix, summed over
  the ranks' shards block by block, or, when the batch is smaller than the number
  of live pixels, the Gram matrix of the per-sample factors xᵢ ⊗ Sᵢ (SᵢSᵢᵀ = Aᵢ on
  1^⊥), of size n·(C−1). Both have the nonzero eigenvalues of H. Two HVPs check the
  assembled matrix against the distributed operator.
- any model with at most DENSE_LIMIT parameters: H·eⱼ for every unit vector.

Matrix-free route (`matrix_free`): an adaptive randomized range finder (Halko,
Martinsson & Tropp 2011, Alg. 4.2) grown as a block Krylov space with full
reorthogonalization. Each step multiplies by H, in one block (one gather and one
reduce-scatter for the whole block), the directions the previous step added to the
basis Q together with fresh Gaussian probes; the products of the directions give
their columns of QᵀHQ, and all the products, projected out of Q (block CGS2 in a SLEPc
BV, TSQR, rank-revealing by an SVD of the block's R factor), give the next directions,
kept while their singular value exceeds δ. The basis is complete when a step with a
whole block of fresh probes adds none; then Rayleigh–Ritz, the eigenvalues of QᵀHQ,
needs no further product. Fresh probes see every copy of a repeated eigenvalue (one
Krylov vector sees one). Cost: about rank + 300 HVPs (each direction is multiplied
once; the probes that widen the blocks to a quarter of the basis, at most 256, and the
final block of 16), and a SLEPc norm estimate.

Accuracy. δ = max(tol/16, 8·√n·ε)·‖H‖, the second term keeping δ above the rounding
noise of a product with a Gaussian probe (about 2·√n·ε·‖H‖ measured). When 16 fresh
probes all leave residuals ≤ δ, ‖(I − QQᵀ)H‖ ≤ 8δ with probability ≥ 1 − 10⁻¹⁶
(Halko et al. eq. 4.3), so by Weyl's inequality every eigenvalue of H is within 8δ
of a Ritz value or of a number of modulus ≤ 8δ: the count is exact unless some
|λ| lies within `band` = 8δ/‖H‖ of tol·‖H‖. With the default tol, band = tol/2 for
n ≥ 16,384 (the CNN) and 0.72·tol for softmax regression. The per-threshold counts
show how far the eigenvalues are from the threshold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .. import runtime
from ..curvature.operator import sum_over_ranks
from ..errors import HessmpiError

THRESHOLDS = (1e-2, 1e-4, 1e-6, 1e-8, 1e-10, 1e-12)
DEFAULT_BATCH_SIZES = (1, 5, 10, 50, 100, 200, 500, 1000, 5000)
DENSE_LIMIT = 4096  # parameters: above this only softmax regression has a dense route
METHODS = ("dense", "matrix-free")
N_LEADING = 10


def default_tol(n: int, dtype: str = "float64") -> float:
    """tol = n·ε(dtype): numpy's matrix_rank rule for an n × n matrix."""
    return float(n * np.finfo(np.dtype(dtype)).eps)


def numerical_rank(values, tol: float) -> int:
    """How many of the eigenvalues have |λ| > tol·max|λ| (0 for an empty or zero list)."""
    a = np.abs(np.asarray(values, dtype=np.float64))
    if a.size == 0 or a.max() == 0:
        return 0
    return int(np.count_nonzero(a > tol * a.max()))


def parse_batch_sizes(text: str | None, available: int | None) -> list[int]:
    """The batch sizes of --batch-sizes '1,5,10' (sorted, duplicates dropped), each in
    1..available (not checked if available is None). None gives DEFAULT_BATCH_SIZES up
    to `available`, plus `available` itself when a default size had to be dropped."""
    if text is None:
        if available is None:
            return list(DEFAULT_BATCH_SIZES)
        sizes = [n for n in DEFAULT_BATCH_SIZES if n <= available]
        if len(sizes) < len(DEFAULT_BATCH_SIZES):
            sizes.append(available)
        return sorted(set(sizes))
    sizes = []
    for item in text.split(","):
        item = item.strip()
        try:
            n = int(item)
        except ValueError:
            raise HessmpiError(f"--batch-sizes {text!r}: {item!r} is not an integer; give a "
                               f"comma-separated list such as 1,5,10,100") from None
        if n < 1:
            raise HessmpiError(f"--batch-sizes {text!r}: batch sizes must be at least 1, got {n}")
        sizes.append(n)
    too_big = [n for n in sizes if available is not None and n > available]
    if too_big:
        raise HessmpiError(f"--batch-sizes: {', '.join(map(str, too_big))} exceed the {available:,} "
                           f"available training samples (the maximum batch size is {available})")
    return sorted(set(sizes))


# ---------------------------------------------------------------- results


@dataclass
class Spectrum:
    """What one route found for one matrix of size n: its eigenvalues (descending; the
    eigenvalues not listed are exact zeros, or unknown if `lower_bound`), and the rank."""

    method: str
    n: int
    tol: float
    values: np.ndarray
    rank: int
    lower_bound: bool = False  # matrix-free hit max_rank: rank ≥ `rank`, values not computed
    n_hvps: int = 0
    seconds: float = 0.0
    subspace_dim: int = -1  # matrix-free: columns of the range basis
    blocks: int = 0  # matrix-free: blocks of probes drawn
    hvp_check: float = float("nan")  # dense softmax: relative error of the assembled H against HVPs
    vectors: np.ndarray | None = None  # (k, n) top eigenvectors, dense route only
    extra: dict = field(default_factory=dict)

    def leading(self, k: int = N_LEADING) -> np.ndarray:
        """The k largest eigenvalues, NaN-padded (all NaN when not computed)."""
        out = np.full(k, np.nan)
        if not self.lower_bound:
            top = self.values[:k]
            out[:len(top)] = top
        return out

    def counts(self, thresholds=THRESHOLDS) -> np.ndarray:
        """How many |λ| exceed t·max|λ| for each t (−1 when not computed)."""
        if self.lower_bound:
            return np.full(len(thresholds), -1, dtype=np.int64)
        return np.array([numerical_rank(self.values, t) for t in thresholds], dtype=np.int64)

    @property
    def minimum(self) -> float:
        """The smallest eigenvalue of the matrix (0 if any eigenvalue was not listed)."""
        if self.lower_bound:
            return float("nan")
        low = float(self.values.min()) if self.values.size else 0.0
        return low if self.values.size == self.n else min(low, 0.0)

    @property
    def n_negative(self) -> int:
        """How many eigenvalues are below −tol·max|λ| (−1 when not computed)."""
        if self.lower_bound or self.values.size == 0:
            return -1 if self.lower_bound else 0
        scale = np.abs(self.values).max()
        return int(np.count_nonzero(self.values < -self.tol * scale))

    @property
    def gap(self) -> tuple[float, float]:
        """(smallest |λ| counted, largest |λ| listed but not counted), relative to max|λ|:
        the rank is sharp when the first is far above the second."""
        a = np.abs(self.values)
        if self.lower_bound or a.size == 0 or a.max() == 0:
            return float("nan"), float("nan")
        a = a / a.max()
        counted, rest = a[a > self.tol], a[a <= self.tol]
        return (float(counted.min()) if counted.size else float("nan"),
                float(rest.max()) if rest.size else 0.0)


def _finish(method, n, tol, values, start_hvps, hvps_now, t0, **kw) -> Spectrum:
    values = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    return Spectrum(method, n, tol, values, numerical_rank(values, tol), n_hvps=hvps_now - start_hvps,
                    seconds=time.perf_counter() - t0, **kw)


def _relative_error(a, b) -> float:
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else float(np.linalg.norm(a))


def _root_then_bcast(comm, work):
    """Run work() on rank 0 and broadcast its result. The other ranks wait sleeping rather
    than spinning in MPI, which matters when ranks outnumber cores."""
    out = work() if comm.Get_rank() == 0 else None
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.005)
    return comm.bcast(out, root=0)


# ---------------------------------------------------------------- the batch


@dataclass
class Batch:
    """The Hessian of the mean loss over n_samples samples at θ: the model, this rank's
    shard of the images (float64, (m, s, s, 1)), and the distributed operator."""

    model: object
    theta: np.ndarray
    images: np.ndarray
    n_samples: int
    op: object  # operator.DistributedOperator

    @property
    def comm(self):
        return self.op.comm

    @classmethod
    def from_problem(cls, problem, op=None) -> "Batch":
        """The batch of a Problem on op (default its Hessian; its GGN, or a layer's block of
        either); images only where the closed form of softmax regression applies."""
        images = problem.samples.features(*problem.shard) if closed_form(problem) else None
        return cls(problem.model, problem.theta, images, problem.n_samples, op or problem.hessian)


def closed_form(problem) -> bool:
    """Whether the problem is softmax regression with its cross-entropy from logits on
    arrays: its Hessian has the closed form of the dense route."""
    loss = problem.loss
    return (getattr(problem.model, "kind", None) == "softmax" and loss.kind == "sparse"
            and bool(loss.kwargs.get("from_logits")) and hasattr(problem.samples, "features"))


def data_bounds(x: np.ndarray) -> dict:
    """What the images alone say about the softmax Hessian, from the full batch x (n, pixels):
    dead pixels (zero in every image: 10 zero rows of H each), rank(X) (numpy's
    matrix_rank), and the pixel coupling pattern (pixels p, q coupled iff some image
    has both nonzero; H's pattern is this ⊗ a dense C × C block)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    nonzero = (x != 0).astype(np.float32)
    return {
        "dead_pixels": int(np.count_nonzero(nonzero.sum(0) == 0)),
        "rank_x": int(np.linalg.matrix_rank(x)),
        "pattern": (nonzero.T @ nonzero > 0).astype(np.uint8),
    }


# ---------------------------------------------------------------- dense: softmax regression


def shift_basis(classes: int) -> np.ndarray:
    """(C, C−1) orthonormal columns spanning the complement of the all-ones vector."""
    q, _ = np.linalg.qr(np.eye(classes)[:, :classes - 1] - 1.0 / classes)
    return q


def _softmax_curvature(x: np.ndarray, theta: np.ndarray, classes: int) -> np.ndarray:
    """Ãᵢ = Qᵀ(diag(pᵢ) − pᵢpᵢᵀ)Q for each row xᵢ, (m, C−1, C−1), p = softmax(xᵢᵀW)."""
    z = x @ theta.reshape(x.shape[1], classes)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    a = np.einsum("ij,jk->ijk", p, np.eye(classes)) - p[:, :, None] * p[:, None, :]
    q = shift_basis(classes)
    return np.einsum("ca,icd,db->iab", q, a, q)


def _lift(reduced: np.ndarray, live: np.ndarray, pixels: int, classes: int) -> np.ndarray:
    """Vectors (k, live·(C−1)) on live pixels ⊗ 1^⊥ → (k, pixels·C) in θ order."""
    q = shift_basis(classes)
    k = reduced.shape[0]
    out = np.zeros((k, pixels, classes))
    out[:, live, :] = reduced.reshape(k, live.size, classes - 1) @ q.T
    return out.reshape(k, pixels * classes)


def dense_softmax(batch: Batch, tol: float, regularizer=None,
                  n_vectors: int = 0, n_checks: int = 2, seed: int = 0) -> Spectrum:
    """Every eigenvalue of the softmax-regression Hessian H (plus regularizer(), a dense
    n_params² matrix such as γR, if a regularizer is given; it is called on rank 0 only),
    assembled from per-sample factors over the ranks' shards; the top n_vectors
    eigenvectors (θ order) if asked. Collective.

    The assembled H is compared with the distributed operator on n_checks random vectors
    (`hvp_check`: worst relative error)."""
    t0 = time.perf_counter()
    op, comm, model = batch.op, batch.comm, batch.model
    if getattr(model, "kind", None) != "softmax" or batch.images is None or op.n != model.n_params:
        raise HessmpiError("the closed-form dense route is for the softmax model over all its parameters")
    start = op.n_matvecs
    pixels, classes = model.layout[0].shape
    n, m = batch.n_samples, classes - 1
    x = batch.images.reshape(len(batch.images), pixels)
    a = _softmax_curvature(x, batch.theta, classes)
    local_live = (x != 0).any(axis=0)
    live = np.flatnonzero(sum_over_ranks(comm, local_live.astype(np.int64)) > 0)
    xl = x[:, live]

    # H·v from the factors against the HVP of the operator.
    errors = []
    rng = np.random.default_rng([seed, n, 7])
    q = shift_basis(classes)
    for _ in range(n_checks):
        v = rng.standard_normal(pixels * classes)
        vx = x @ (v.reshape(pixels, classes) @ q)  # (samples, C−1)
        local = x.T @ np.einsum("iab,ib->ia", a, vx)
        hv = (sum_over_ranks(op.comm, local) / n) @ q.T
        errors.append(_relative_error(hv.ravel(), op.apply_full(v)))

    use_gram = regularizer is None and n <= live.size
    if use_gram:
        w, u = np.linalg.eigh(a)
        s = u * np.sqrt(np.clip(w, 0.0, None))[:, None, :]  # SᵢSᵢᵀ = Ãᵢ
        parts = comm.gather((xl, s), root=0)

        def work():
            xs = np.concatenate([p[0] for p in parts])
            ss = np.concatenate([p[1] for p in parts])
            flat = ss.transpose(1, 0, 2).reshape(m, n * m)
            gram = flat.T @ flat
            gram *= np.repeat(np.repeat(xs @ xs.T, m, axis=0), m, axis=1)
            gram /= n
            values = np.linalg.eigvalsh(gram)
            vectors = None
            if n_vectors:
                import scipy.linalg

                k = min(n_vectors, gram.shape[0])
                _, us = scipy.linalg.eigh(gram, subset_by_index=[gram.shape[0] - k, gram.shape[0] - 1])
                us = us[:, ::-1].T.reshape(k, n, m)
                reduced = np.einsum("pi,iab,kib->kpa", xs.T, ss, us).reshape(k, -1)
                reduced /= np.linalg.norm(reduced, axis=1, keepdims=True)
                vectors = _lift(reduced, live, pixels, classes)
            return values, vectors
    else:
        size = live.size * m
        h = np.zeros((live.size, m, live.size, m)) if comm.Get_rank() == 0 else None
        for i in range(m):
            for j in range(i, m):
                block = np.ascontiguousarray(xl.T @ (a[:, i, j, None] * xl))
                total = np.empty_like(block) if comm.Get_rank() == 0 else None
                comm.Reduce(block, total, root=0)
                if total is not None:
                    h[:, i, :, j] = total / n
                    h[:, j, :, i] = total.T / n

        def work():
            reduced = h.reshape(size, size)
            if regularizer is None:
                matrix = reduced
            else:
                full = np.zeros((pixels, classes, pixels, classes))
                lifted = np.einsum("paqb,ca,db->pcqd", h, q, q, optimize=True)
                full[np.ix_(live, range(classes), live, range(classes))] = lifted
                matrix = full.reshape(pixels * classes, pixels * classes) + regularizer()
            values = np.linalg.eigvalsh(matrix)
            vectors = None
            if n_vectors:
                import scipy.linalg

                k = min(n_vectors, matrix.shape[0])
                _, us = scipy.linalg.eigh(matrix, subset_by_index=[matrix.shape[0] - k, matrix.shape[0] - 1])
                us = us[:, ::-1].T
                vectors = _lift(us, live, pixels, classes) if regularizer is None else us
            return values, vectors

    values, vectors = _root_then_bcast(comm, work)
    return _finish("dense", pixels * classes, tol, values, start, op.n_matvecs, t0,
                   hvp_check=max(errors) if errors else float("nan"), vectors=vectors,
                   extra={"assembly": "gram" if use_gram else "hessian", "live_pixels": int(live.size)})


# ---------------------------------------------------------------- dense: unit vectors


def dense_from_hvps(batch: Batch, tol: float, regularizer=None, n_vectors: int = 0) -> Spectrum:
    """Every eigenvalue of H (+ regularizer(), a dense matrix) from its columns H·eⱼ (n_params HVPs): for
    models with at most DENSE_LIMIT parameters. Collective."""
    t0 = time.perf_counter()
    op = batch.op
    n = op.n
    if n > DENSE_LIMIT:
        raise HessmpiError(f"the dense route assembles H from {n:,} HVPs and needs {n * n * 8 / 2**30:.0f} GiB; "
                           f"it is for models up to {DENSE_LIMIT:,} parameters (and softmax regression): "
                           f"use --method matrix-free")
    start = op.n_matvecs
    h = np.column_stack([op.apply_full(e) for e in np.eye(n)])
    h = 0.5 * (h + h.T)
    if regularizer is not None:
        h = h + regularizer()
    values, u = np.linalg.eigh(h)  # the same input on every rank gives the same output
    vectors = u[:, ::-1][:, :n_vectors].T.copy() if n_vectors else None
    return _finish("dense", n, tol, values, start, op.n_matvecs, t0, vectors=vectors,
                   extra={"assembly": "unit-vectors"})


# ---------------------------------------------------------------- matrix-free


def _new_bv(template, columns: int, prefix: str):
    SLEPc = runtime.slepc()

    bv = SLEPc.BV().create(template.getComm())
    bv.setSizesFromVec(template, columns)
    # TSQR is Householder-based: an orthonormal basis even for a rank-deficient block.
    bv.setOrthogonalization(block=SLEPc.BV.OrthogBlockType.TSQR)
    bv.setOptionsPrefix(prefix)
    bv.setFromOptions()
    return bv


def _dense_seq(rows: int, cols: int, array: np.ndarray | None = None):
    PETSc = runtime.petsc()

    mat = PETSc.Mat().createDense((rows, cols), comm=PETSc.COMM_SELF)
    mat.setUp()
    if array is None:
        mat.zeroEntries()
    else:
        mat.getDenseArray()[:, :] = array
    mat.assemble()
    return mat


def _project_out(w, q, k: int) -> None:
    """W ← (I − QQᵀ)W against the first k columns of Q, twice (block CGS2)."""
    if k == 0:
        return
    q.setActiveColumns(0, k)
    for _ in range(2):
        c = w.dot(q)  # Qᵀ W
        w.mult(-1.0, 1.0, q, c)
        c.destroy()


def _orthonormalize(w, b: int) -> np.ndarray:
    """Orthonormalize the b active columns of W in place (TSQR); returns the R factor."""
    r = _dense_seq(b, b)
    w.orthogonalize(r)
    out = r.getDenseArray().copy()
    r.destroy()
    return np.triu(out)


def probe(seed: int, stream: int, j: int, n: int) -> np.ndarray:
    """The j-th standard Gaussian probe of length n (the same whatever the rank count)."""
    return np.random.default_rng([seed, stream, j]).standard_normal(n)


def _columns_to_array(bv, start: int, stop: int) -> np.ndarray:
    """This rank's rows of columns start:stop of a BV, as an (n_local, stop − start) array."""
    bv.setActiveColumns(start, stop)
    m = bv.getMat()
    out = np.array(m.getDenseArray(), order="C")
    bv.restoreMat(m)
    return out


def _array_to_columns(bv, array: np.ndarray) -> None:
    """Columns 0:b of bv ← array (n_local × b); leaves them active."""
    bv.setActiveColumns(0, array.shape[1])
    m = bv.getMat()
    m.getDenseArray()[:, :] = array
    bv.restoreMat(m)


def column_products(mat):
    """A mult_block for any PETSc matrix: the block's columns one at a time through mat.mult."""
    x, y = mat.createVecs()

    def mult_block(xs: np.ndarray) -> np.ndarray:
        out = np.empty_like(xs)
        for j in range(xs.shape[1]):
            x.getArray()[:] = xs[:, j]
            mat.mult(x, y)
            out[:, j] = y.getArray(readonly=True)
        return out
    return mult_block


class _Gram:
    """QᵀHQ on rank 0, grown a block of columns at a time (capacity doubled as needed)."""

    def __init__(self, root: bool):
        self.root, self.k, self.a = root, 0, np.zeros((0, 0))

    def add_columns(self, m, k: int, new: int) -> None:
        """Columns (and, by symmetry, rows) k − new … k − 1 from m = Q[:, :k]ᵀ·H·Q[:, k − new:k]."""
        if self.root:
            if k > self.a.shape[0]:
                grown = np.zeros((max(k, 2 * self.a.shape[0]),) * 2)
                grown[:self.k, :self.k] = self.a[:self.k, :self.k]
                self.a = grown
            self.a[:k, k - new:k] = m.getDenseArray()
            self.a[k - new:k, :k] = self.a[:k, k - new:k].T
            self.k = k

    def eigenvalues(self) -> np.ndarray:
        a = self.a[:self.k, :self.k]
        return np.linalg.eigvalsh(0.5 * (a + a.T))


def matrix_free(mat, tol: float, max_rank: int, seed: int = 0, stream: int = 0, counter=None,
                norm: float | None = None, eps: float = np.finfo(np.float64).eps,
                min_block: int = 16, max_block: int = 256, mult_block=None, log=None) -> Spectrum:
    """Eigenvalues of the symmetric PETSc matrix `mat` on its numerical range, by a block
    Krylov range finder with full reorthogonalization and Rayleigh–Ritz (module
    docstring). Collective.

    Each step multiplies, in one block, the directions the step before added to the basis
    Q and fresh Gaussian probes: up to the step's size (a quarter of the basis, between
    min_block and max_block), or min_block of them after a step that added fewer
    directions than it multiplied. The products of the directions are the new columns of QᵀHQ;
    all the products, projected against Q, are the candidates for the next directions,
    kept while their singular value exceeds δ = max(tol/16, 8·√n·eps)·‖H‖ (eps the unit
    roundoff of the products). It stops when a step with at least min_block fresh probes
    adds no direction. If the basis would exceed max_rank columns the result is a lower
    bound (rank ≥ max_rank, no eigenvalues). norm is ‖H‖₂ (estimated with SLEPc if not
    given). mult_block(X) returns this rank's rows of H·X for this rank's rows of a block
    X (n_local × b; default `column_products(mat)`); counter() returns the operator's HVP
    count; log(str) gets a line per step."""
    from . import eigen

    comm = mat.getComm().tompi4py()
    counter = counter or (lambda: 0)
    mult_block = mult_block or column_products(mat)
    start, t0 = counter(), time.perf_counter()
    n = mat.getSize()[0]
    max_rank = max(1, min(max_rank, n))
    norm = eigen.norm_estimate(mat, seed) if norm is None else norm
    if norm == 0.0:
        return _finish("matrix-free", n, tol, np.zeros(0), start, counter(), t0, subspace_dim=0)
    delta = max(tol / 16, 8 * np.sqrt(n) * eps) * norm
    template = mat.createVecRight()
    lo, hi = template.getOwnershipRange()
    q = _new_bv(template, min(max_rank, 2 * max_block), "rank_")
    w = _new_bv(template, max_block + min_block, "rank_")
    gram = _Gram(comm.Get_rank() == 0)
    k = pending = drawn = steps = 0  # basis size; its last `pending` columns await their products
    lower_bound = saturating = False
    while True:
        if k == n:
            fresh = 0
        elif saturating:  # the last step added fewer directions than it multiplied: check
            fresh = max(0, min(min_block, max_block + min_block - pending))
        else:
            fresh = max(0, min(max(min_block, k // 4), max_block) - pending)
        block = np.empty((hi - lo, pending + fresh))
        block[:, :pending] = _columns_to_array(q, k - pending, k)
        for j in range(fresh):
            block[:, pending + j] = probe(seed, stream, drawn + j, n)[lo:hi]
        drawn += fresh
        steps += 1
        b = pending + fresh
        _array_to_columns(w, mult_block(block))
        if pending:
            w.setActiveColumns(0, pending)
            q.setActiveColumns(0, k)
            m = w.dot(q)  # Q[:, :k]ᵀ·H·Q[:, k − pending:k]
            gram.add_columns(m, k, pending)
            m.destroy()
        if k == n:
            break
        w.setActiveColumns(0, b)
        _project_out(w, q, k)
        w.setActiveColumns(0, b)
        u, s, _ = np.linalg.svd(_orthonormalize(w, b))
        new = int(np.count_nonzero(s > delta))
        if k + new > max_rank:
            new, lower_bound = max_rank - k, True
        if log:
            log(f"step {steps}: {pending} basis directions and {fresh} probes multiplied, {new} new directions "
                f"(largest residual {s[0] / norm:.1e}·‖H‖), basis {k + new}, {counter() - start} HVPs")
        if new == 0 and fresh >= min_block:
            break
        if new:
            # The new directions W·U[:, :new], made orthogonal to Q again: normalising a
            # small residual magnifies what is left of Q in it.
            w.multInPlace(_dense_seq(b, b, u), 0, new)
            w.setActiveColumns(0, new)
            _project_out(w, q, k)
            w.setActiveColumns(0, new)
            _orthonormalize(w, new)
            if k + new > q.getSizes()[1]:
                q.resize(min(max_rank, max(2 * q.getSizes()[1], k + new)), copy=True)
            for j in range(new):
                col = w.getColumn(j)
                q.insertVec(k + j, col)
                w.restoreColumn(j, col)
        k += new
        pending, saturating = new, new < b
        if lower_bound:
            break
    values = np.zeros(0)
    if not lower_bound and k:
        values = _root_then_bcast(comm, gram.eigenvalues)
    for obj in (q, w, template):
        obj.destroy()
    spectrum = _finish("matrix-free", n, tol, values, start, counter(), t0, subspace_dim=k, blocks=steps,
                       lower_bound=lower_bound,
                       extra={"norm_estimate": norm, "delta": delta, "band": 8 * delta / norm})
    if lower_bound:
        spectrum.rank = k
    return spectrum


# ---------------------------------------------------------------- one batch, both routes


def analyse(batch: Batch, methods, tol: dict, regularization: str = "none", gamma: float = 0.0,
            max_rank: int | None = None, n_vectors: int = 0, seed: int = 0, dtype: str = "float64",
            log=None) -> dict:
    """The spectra of H (or H + γR) of one batch by each route in `methods`
    ({'dense', 'matrix-free'}), as {method: Spectrum}. tol maps method → tolerance;
    dtype is the precision of the HVPs. Collective."""
    from ..curvature import regularizers
    from ..curvature.petsc import shell_matrix

    model, op = batch.model, batch.op
    if regularization != "none" and op.n != model.n_params:
        raise HessmpiError("a regularizer acts on all the parameters: do not combine it with one layer's block")
    out = {}
    if "dense" in methods:
        reg = None
        if regularization != "none":
            def reg():
                return gamma * regularizers.dense_matrix(regularization, model)
        if getattr(model, "kind", None) == "softmax" and batch.images is not None and op.n == model.n_params:
            out["dense"] = dense_softmax(batch, tol["dense"], reg, n_vectors, seed=seed)
        else:
            out["dense"] = dense_from_hvps(batch, tol["dense"], reg, n_vectors)
    if "matrix-free" in methods:
        matrix = op if regularization == "none" else op + gamma * regularizers.operator(regularization, model, op.comm)
        mat = shell_matrix(matrix)
        try:
            out["matrix-free"] = matrix_free(mat, tol["matrix-free"], max_rank or op.n, seed=seed,
                                             stream=batch.n_samples, counter=lambda: matrix.n_matvecs,
                                             eps=float(np.finfo(np.dtype(dtype)).eps),
                                             mult_block=matrix.apply_block, log=log)
        finally:
            mat.destroy()
    return out
