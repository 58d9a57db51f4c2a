"""SLEPc eigen solves of a symmetric shell matrix, returning every copy of repeated eigenvalues.

A single-vector Krylov method sees one direction of each eigenspace from its start
vector, so it can silently return fewer copies of a repeated eigenvalue than there
are (the softmax Hessian at W = 0 has every nonzero eigenvalue 9 times). We solve in
*passes*: pass p deflates every pair found so far (EPSSetDeflationSpace) and starts
from a fresh random vector; the pairs it finds are merged with the earlier ones and
the best `nev` kept. The solve stops when a pass finds nothing better than the
`nev`-th value already held, which is the post-check that no copy is missing.
SLEPc's default convergence test is relative to |λ|, which a zero eigenvalue never
passes, and a Hessian's smallest eigenvalues are often zero. For `which="smallest"`
the test is absolute, ‖Hx − λx‖ ≤ tol·‖H‖₂, with ‖H‖₂ estimated first by a loose
largest-magnitude solve. Options are read with a prefix (`-hess_eps_type lanczos -hess_eps_tol 1e-10`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from petsc4py import PETSc
from slepc4py import SLEPc

from .errors import HessmpiError

WHICH = {
    "largest": SLEPc.EPS.Which.LARGEST_REAL,
    "smallest": SLEPc.EPS.Which.SMALLEST_REAL,
    "magnitude": SLEPc.EPS.Which.LARGEST_MAGNITUDE,
}


@dataclass
class EigenResult:
    """Eigenpairs sorted best first for `which`, with their true residuals ‖Hx−λx‖."""

    values: np.ndarray
    vectors: list  # PETSc Vecs, distributed like the matrix
    residuals: np.ndarray
    n_matvecs: int = 0
    iterations: int = 0
    passes: int = 0
    converged: int = 0
    wall_time: float = 0.0
    solver: str = ""
    pass_log: list = field(default_factory=list)
    norm_estimate: float = float("nan")


def _order_key(which: str):
    if which == "largest":
        return lambda lam: -lam
    if which == "smallest":
        return lambda lam: lam
    return lambda lam: -abs(lam)


def _random_vec(mat, seed: int) -> PETSc.Vec:
    """A unit random vector that does not depend on the rank count (drawn in full, then sliced)."""
    n = mat.getSize()[1]
    full = np.random.default_rng(seed).standard_normal(n)
    v = mat.createVecRight()
    lo, hi = v.getOwnershipRange()
    v.getArray()[:] = full[lo:hi] / np.linalg.norm(full)
    return v


def _new_eps(mat, which, nev, tol, max_it, prefix):
    eps = SLEPc.EPS().create(comm=mat.getComm())
    eps.setOperators(mat)
    eps.setProblemType(SLEPc.EPS.ProblemType.HEP)
    eps.setWhichEigenpairs(WHICH[which])
    eps.setDimensions(nev)
    eps.setTolerances(tol, max_it)
    eps.setOptionsPrefix(prefix)
    return eps


def norm_estimate(mat, seed: int = 0, prefix: str = "hess_norm_") -> float:
    """‖H‖₂ to about three digits: a loose SLEPc solve for the largest-magnitude eigenvalue."""
    eps = _new_eps(mat, "magnitude", 1, 1e-3, None, prefix)
    eps.setInitialSpace([_random_vec(mat, seed + 104729)])
    eps.setFromOptions()
    eps.solve()
    value = abs(eps.getEigenvalue(0).real) if eps.getConverged() else 0.0
    eps.destroy()
    return value


def solve(mat: PETSc.Mat, nev: int, which: str = "largest", tol: float = 1e-8,
          max_it: int | None = None, prefix: str = "hess_", seed: int = 0,
          max_passes: int = 20, matvec_counter=None, log=None) -> EigenResult:
    """The nev best eigenpairs of the symmetric matrix mat for `which`, every copy included.

    tol is SLEPc's relative residual tolerance; options under `prefix` override the
    defaults set here. `matvec_counter()` returns the operator's product count so that
    the result can report what the solve cost. log(str) receives one line per pass.
    """
    n = mat.getSize()[0]
    if which not in WHICH:
        raise HessmpiError(f"unknown --which {which!r}: choose one of {', '.join(WHICH)}")
    if not 1 <= nev < n:
        raise HessmpiError(f"--nev must be between 1 and {n - 1} (the operator has {n} rows), got {nev}")
    key = _order_key(which)
    count = matvec_counter or (lambda: 0)
    start_matvecs, t0 = count(), time.perf_counter()
    held: list = []  # (value, Vec, residual)
    result = EigenResult(np.empty(0), [], np.empty(0))
    if which == "smallest":
        result.norm_estimate = norm_estimate(mat, seed)
        if log:
            log(f"‖H‖₂ ≈ {result.norm_estimate:.4g} (scale of the absolute convergence test)")
    want = nev
    for p in range(max_passes):
        want = min(want, n - 1 - len(held))
        if want < 1:
            break
        if which == "smallest":
            eps = _new_eps(mat, which, want, tol * (result.norm_estimate or 1.0), max_it, prefix)
            eps.setConvergenceTest(SLEPc.EPS.Conv.ABS)
        else:
            eps = _new_eps(mat, which, want, tol, max_it, prefix)
        if held:
            eps.setDeflationSpace([v for _, v, _ in held])
        eps.setInitialSpace([_random_vec(mat, seed * 7919 + p)])
        eps.setFromOptions()
        eps.solve()
        result.solver = eps.getType()
        result.iterations += eps.getIterationNumber()
        found = []
        for i in range(eps.getConverged()):
            v = mat.createVecRight()
            lam = eps.getEigenpair(i, v).real
            found.append((lam, v, eps.computeError(i, SLEPc.EPS.ErrorType.ABSOLUTE)))
        eps.destroy()
        threshold = held[-1][0] if len(held) >= nev else None
        merged = sorted(held + found, key=lambda t: key(t[0]))[:nev]
        scale = max([abs(t[0]) for t in merged] + [result.norm_estimate if which == "smallest" else 0.0]) or 1.0
        gained = sum(key(lam) < key(threshold) - 10 * tol * scale
                     for lam, _, _ in found) if threshold is not None else len(found)
        improved = gained > 0
        line = (f"pass {p + 1}: {len(found)} new pairs, best {found[0][0]:.10g}" if found
                else f"pass {p + 1}: no new pair converged")
        result.pass_log.append(line)
        if log:
            log(line + f" ({count() - start_matvecs} matvecs so far)")
        held = merged
        result.passes = p + 1
        if not found or not improved:
            break
        want = 1 if p == 0 else min(nev, 2 * gained)
        if p + 1 == max_passes:
            raise HessmpiError(f"the eigen solve still found missing copies after {max_passes} passes; "
                               f"raise the pass limit or ask for fewer eigenpairs")
    for _, v, _ in held:  # a deterministic sign: the largest-magnitude entry positive
        arr = v.getArray(readonly=True)
        local = (abs(arr).max(), arr[abs(arr).argmax()]) if arr.size else (-1.0, 0.0)
        best = max(mat.getComm().tompi4py().allgather(local))
        if best[1] < 0:
            v.scale(-1.0)
    result.values = np.array([t[0] for t in held])
    result.vectors = [t[1] for t in held]
    result.residuals = np.array([t[2] for t in held])
    result.converged = len(held)
    result.n_matvecs = count() - start_matvecs
    result.wall_time = time.perf_counter() - t0
    return result
