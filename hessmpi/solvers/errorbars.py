"""Error bars of eigenvalues from the spread of Rayleigh quotients over groups of samples.

The matrix we analyse is a mean over N samples, P = (1/N) Σᵢ Pᵢ (the Hessian or the
GGN of the mean loss). For a fixed unit vector v (an eigenvector) its Rayleigh
quotient vᵀPv = (1/N) Σᵢ vᵀPᵢv is a sample mean, and the training set is a sample
of the data. Split the N samples into G contiguous groups g of n_g samples and let
r_g = vᵀ(Σ_{i∈g} Pᵢ)v / n_g. Then

    estimate  = Σ_g n_g r_g / N                     (= vᵀPv, the eigenvalue for an eigenvector)
    σ̂²        = Σ_g n_g (r_g − estimate)² / (G − 1) (per-sample variance of vᵀPᵢv)
    stderr    = σ̂ / √N                              (= sd(r_g)/√G when the groups are equal)
    interval  = estimate ± t_{G−1, (1+c)/2} · stderr

With the default G = the number of ranks, each group is exactly one rank's shard,
so the whole cost is one local product per vector and one small reduction. What
this interval is, honestly:

- It is the sampling error of vᵀPv *for the fixed direction v*: how much the
  Rayleigh quotient would move if the N training samples were redrawn from the same
  distribution, assuming the groups are exchangeable samples of it (the rows in
  canonical order are not sorted by anything that matters; for mnist-5k the
  canonical order interleaves the classes, so each group is class-balanced and the
  spread is, if anything, smaller than under random sampling).
- It does not include the bias of selecting v from the same data: the top
  eigenvalue of a sample mean of matrices overestimates the population's on
  average (and the bottom one underestimates it), and this interval does not see that.
- It does not include the eigensolver's error (the residual ‖Pv − λv‖, which the
  spectrum reports separately).
- The t-interval assumes the r_g are roughly normal (each is a mean over n_g
  samples). With few groups it is wide by construction: t_{1, 0.975} = 12.7 for
  G = 2, 4.30 for G = 3, 2.26 for G = 10.
- With one group (one rank and the default G) there is no spread to measure: stderr
  and the interval are NaN. Ask for G > 1 groups to get one on any rank count; any
  fixed G gives the same numbers at every rank count (the groups are then
  independent of the shards).

The group products of a vector add up to its product with the whole matrix, so the
same pass also gives P·v (`products`): the spectrum takes its true residuals
‖Pv − λv‖ from it instead of multiplying every eigenvector once more.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..curvature.operator import sum_over_ranks
from ..data.shard import shard_range
from ..errors import HessmpiError, NumericalError


@dataclass
class RayleighSpread:
    """Per vector k: the Rayleigh quotient over all samples with its standard error and
    confidence interval, from the group quotients r_g (quotients[g, k])."""

    quotients: np.ndarray  # (G, K)
    sizes: np.ndarray  # (G,)
    estimate: np.ndarray  # (K,)
    stderr: np.ndarray  # (K,), NaN if G < 2
    low: np.ndarray
    high: np.ndarray
    confidence: float
    dof: int  # G − 1
    products: np.ndarray | None = None  # (K, n): P·v of each vector, if asked for


def spread_from_quotients(quotients: np.ndarray, sizes: np.ndarray, confidence: float = 0.95) -> RayleighSpread:
    """The statistics of the module docstring from the group quotients r_g (G × K) and sizes n_g."""
    from scipy import stats

    quotients = np.atleast_2d(np.asarray(quotients, dtype=float))
    sizes = np.asarray(sizes, dtype=float)
    G, N = len(sizes), sizes.sum()
    estimate = sizes @ quotients / N
    if G > 1:
        sigma2 = sizes @ (quotients - estimate) ** 2 / (G - 1)
        stderr = np.sqrt(sigma2 / N)
        half = stats.t.ppf(0.5 + confidence / 2, G - 1) * stderr
    else:
        stderr = half = np.full(quotients.shape[1], np.nan)
    return RayleighSpread(quotients, sizes.astype(np.int64), estimate, stderr, estimate - half,
                          estimate + half, confidence, G - 1)


def rayleigh_spread(shard_product, vectors, shard: tuple[int, int], n_samples: int, comm,
                    n_groups: int | None = None, confidence: float = 0.95, fixed_product=None,
                    scale: float | None = None) -> RayleighSpread:
    """Group Rayleigh quotients of each row of `vectors` (K × n, the same on every rank) and
    their spread. Collective.

    shard_product(v, samples) must return Σᵢ Pᵢ·v over this rank's shard rows `samples`
    (a slice of local row indices); shard = (start, stop) is the shard's range among
    the n_samples global rows. n_groups defaults to the number of ranks (a group per
    shard) and is capped at n_samples. Costs one local product per vector.
    fixed_product(v), if given, is a part of the matrix that is no mean over samples (the
    model's regularization terms): its quotient vᵀFv is added to every group's.
    With `scale` (1/N for P the mean), the result also holds the products
    P·v = scale·Σᵢ Pᵢ·v + F·v of the vectors (K × n on every rank), from the same local
    products and one more all-reduce.
    """
    vectors = np.atleast_2d(np.asarray(vectors, dtype=float))
    G = min(n_groups or comm.Get_size(), n_samples)
    if G < 1:
        raise ValueError(f"the number of groups must be at least 1, got {n_groups}")
    bounds = [shard_range(n_samples, G, g) for g in range(G)]
    lo, hi = shard
    pieces = [(g, slice(max(a, lo) - lo, min(b, hi) - lo)) for g, (a, b) in enumerate(bounds)
              if max(a, lo) < min(b, hi)]
    sums = np.zeros((G, len(vectors)))
    fixed = np.zeros(len(vectors))
    local = np.zeros_like(vectors) if scale is not None else None  # Σᵢ Pᵢ·v over this rank's samples
    fixed_products = np.zeros_like(vectors) if scale is not None and fixed_product is not None else None
    for k, v in enumerate(vectors):
        vv = v @ v
        for g, rows in pieces:
            pv = shard_product(v, rows)
            sums[g, k] = v @ pv / vv
            if local is not None:
                local[k] += pv
        if fixed_product is not None:
            fv = fixed_product(v)
            fixed[k] = v @ fv / vv
            if fixed_products is not None:
                fixed_products[k] = fv
    total = sum_over_ranks(comm, sums)
    sizes = np.array([b - a for a, b in bounds])
    spread = spread_from_quotients(total / sizes[:, None] + fixed, sizes, confidence)
    if local is not None:
        spread.products = sum_over_ranks(comm, local)
        del local
        spread.products *= scale
        if fixed_products is not None:
            spread.products += fixed_products
    return spread


def supports(op) -> bool:
    """Whether op is the curvature of a Problem's samples (Hessian or GGN, all of θ or a block),
    whose eigenvalues get error bars."""
    return getattr(op, "sample_product", None) is not None and getattr(op, "problem", None) is not None


def for_operator(op, vectors, n_groups: int | None = None, confidence: float = 0.95,
                 products: bool = False) -> RayleighSpread:
    """rayleigh_spread for a Problem's curvature operator (Hessian or GGN, all of θ or one
    layer's block): vectors have the operator's size. With `products`, the result holds
    op·v of each vector too, and op counts them as products (one per vector, which is what
    the group products cost). Collective."""
    if not supports(op):
        raise HessmpiError("error bars need a curvature of the data (a Hessian or GGN of a problem, or a "
                           "block of one), not a sum with other terms")
    problem = op.problem
    started, compute = time.perf_counter(), [0.0]

    def timed(product):  # the local products' seconds are computation, the rest communication
        def run(*args):
            t0 = time.perf_counter()
            out = product(*args)
            compute[0] += time.perf_counter() - t0
            return out
        return None if product is None else run

    spread = rayleigh_spread(timed(op.sample_product), vectors, problem.shard, problem.n_samples, problem.comm,
                             n_groups, confidence, timed(op.fixed_product), op.scale if products else None)
    if products:
        op.count_products(len(spread.products), compute[0], time.perf_counter() - started - compute[0])
        if not np.isfinite(spread.products).all():  # the same on every rank
            raise NumericalError("the error bars' products of the eigenvectors are not finite (NaN or Inf): "
                                 "check the weights and try float64", collective=True)
    return spread
