"""SLEPc eigen solves of a symmetric shell matrix, returning every copy of repeated eigenvalues.

A single-vector Krylov method sees one direction of each eigenspace from its start
vector, so it can silently return fewer copies of a repeated eigenvalue than there
are (the softmax Hessian at W = 0 has every nonzero eigenvalue 9 times). We solve in
*passes*: pass p deflates every pair found so far (EPSSetDeflationSpace) and starts
from a fresh random vector; the pairs it finds are merged with the earlier ones and
the best `nev` kept. The solve stops when a pass finds nothing better than the
`nev`-th value already held, which is the post-check that no copy is missing.
SLEPc's default convergence test is relative to |λ|, which a zero eigenvalue never
passes, and zero eigenvalues are the rule in a Hessian: the smallest ones, and the
largest ones too once nev exceeds the rank or the matrix is negative semi-definite.
So the test is absolute, ‖Hx − λx‖ ≤ tol·‖H‖₂ (SLEPc's EPS_CONV_ABS), with ‖H‖₂
estimated first by a loose largest-magnitude solve (13–16 products for the CNN).
For `which="largest"` that estimate is skipped (bench/eigen_cost.py): the first pass
uses SLEPc's relative test ‖Hx − λx‖ ≤ tol·|λ|, which implies the absolute one
(|λ| ≤ ‖H‖₂) and is what users check; a guard stops it when the wanted pairs still
unconverged are zero eigenvalues (converged in the absolute sense, never relatively),
and the later passes use the absolute test scaled by |λ₁| held. Options are read with
a prefix (`-hess_eps_type lanczos -hess_eps_tol 1e-10`).
A long solve can be continued in a new process: `solve` reports a `Progress` after
every pass and accepts one back (the spectrum script checkpoints them to a file).
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


@dataclass
class Progress:
    """Where a solve stands after a pass; passed back to `solve` as `resume`, it continues it.

    values/vectors/residuals are the pairs held (best first, at most nev; vectors are
    PETSc Vecs laid out like the matrix), passes the passes done, next_want the pairs
    the next pass asks for (0: the solve has finished). The counters cover every pass.
    """

    values: np.ndarray
    vectors: list
    residuals: np.ndarray
    passes: int
    next_want: int
    iterations: int = 0
    n_matvecs: int = 0
    norm_estimate: float = float("nan")
    pass_log: list = field(default_factory=list)
    solver: str = ""


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


CHECK_TOL = 1e-3  # relative to the scale: the check pass only compares eigenvalues


def _zero_guard(eps, want: int, tol: float) -> None:
    """Stop a relative-test solve once every wanted pair not yet converged is a zero
    eigenvalue: |θ| ≤ √tol·max|θ| and converged in the absolute sense (residual ≤
    tol·max|θ|, over all Ritz values θ): those are zero eigenvalues, which a
    relative test never accepts. The unconverged pairs are left to the next pass."""
    state = {"stop": False}

    def monitor(eps, its, nconv, eig, err):
        k = min(want, len(eig))
        top = max((abs(e.real) for e in eig), default=0.0)  # every Ritz value: the wanted may all be 0
        state["stop"] = nconv < k and top > 0 and all(
            err[i] * abs(eig[i].real) <= tol * top and abs(eig[i].real) <= np.sqrt(tol) * top
            for i in range(nconv, k))

    def stopping(eps, its, max_it, nconv, nev):
        if nconv >= nev:
            return SLEPc.EPS.ConvergedReason.CONVERGED_TOL
        if its >= max_it:
            return SLEPc.EPS.ConvergedReason.DIVERGED_ITS
        if state["stop"]:
            return SLEPc.EPS.ConvergedReason.CONVERGED_USER
        return SLEPc.EPS.ConvergedReason.ITERATING

    eps.setMonitor(monitor)
    eps.setStoppingTest(stopping)


def _scale(result, held, mat, seed, log) -> float:
    """The scale of the absolute test: the ‖H‖₂ estimate, else (which="largest") the
    largest |λ| held, else a fresh estimate."""
    if np.isfinite(result.norm_estimate) and result.norm_estimate > 0:
        return result.norm_estimate
    top = max((abs(t[0]) for t in held), default=0.0)
    if top > 0:
        return top
    result.norm_estimate = norm_estimate(mat, seed)
    if log:
        log(f"‖H‖₂ ≈ {result.norm_estimate:.4g} (scale of the absolute convergence test)")
    return result.norm_estimate or 1.0


def solve(mat: PETSc.Mat, nev: int, which: str = "largest", tol: float = 1e-8,
          max_it: int | None = None, prefix: str = "hess_", seed: int = 0,
          max_passes: int = 20, matvec_counter=None, log=None,
          on_pass=None, resume: Progress | None = None) -> EigenResult:
    """The nev best eigenpairs of the symmetric matrix mat for `which`, every copy included.

    tol is the residual tolerance relative to ‖H‖₂ (for which="largest", relative to
    |λ| in the first pass and to |λ₁| after it: stricter, see the module notes); options under `prefix` override the
    defaults set here. `matvec_counter()` returns the operator's product count so that
    the result can report what the solve cost. log(str) receives one line per pass.
    With max_passes=1 the check pass is skipped; otherwise a solve whose last allowed
    pass still found missing copies raises HessmpiError.

    Restart: on_pass(Progress) is called on every rank after each pass (a collective
    point); given back as `resume` with the same arguments, in a new process too, that
    Progress continues the solve where it stood, and the result equals the
    uninterrupted solve's (the same passes follow from the same held pairs and seeds). The result's n_matvecs,
    iterations and passes then include the resumed passes; wall_time is this call's.
    """
    n = mat.getSize()[0]
    if which not in WHICH:
        raise HessmpiError(f"unknown --which {which!r}: choose one of {', '.join(WHICH)}")
    if not 1 <= nev < n:
        raise HessmpiError(f"--nev must be between 1 and {n - 1} (the operator has {n} rows), got {nev}")
    key = _order_key(which)
    count = matvec_counter or (lambda: 0)
    start_matvecs, t0 = count(), time.perf_counter()
    result = EigenResult(np.empty(0), [], np.empty(0))
    held: list  # (value, Vec, residual), best first
    if resume is not None:
        _check_resume(resume, mat, nev)
        held = list(zip(np.asarray(resume.values).tolist(), resume.vectors, np.asarray(resume.residuals).tolist()))
        p, want = resume.passes, resume.next_want
        result.iterations, result.passes = resume.iterations, resume.passes
        result.norm_estimate, result.pass_log = resume.norm_estimate, list(resume.pass_log)
        result.solver, earlier_matvecs = resume.solver, resume.n_matvecs
        if log:
            log(f"resuming after pass {p} with {len(held)} pairs held "
                f"({earlier_matvecs} matvecs done before)")
    else:
        held, p, want, earlier_matvecs = [], 0, nev, 0
        if which != "largest":
            result.norm_estimate = norm_estimate(mat, seed)
            if log:
                log(f"‖H‖₂ ≈ {result.norm_estimate:.4g} (scale of the absolute convergence test)")
    while want > 0:
        want = min(want, n - 1 - len(held))
        if want < 1:
            break
        if p == max_passes:
            raise HessmpiError(f"the eigen solve still found missing copies after {max_passes} passes; "
                               f"raise the pass limit or ask for fewer eigenpairs")
        relative = which == "largest" and p == 0
        if relative:
            eps = _new_eps(mat, which, want, tol, max_it, prefix)
            eps.setConvergenceTest(SLEPc.EPS.Conv.REL)
            _zero_guard(eps, want, tol)
        else:
            # A check pass (all nev held, none missing so far) only has to show that nothing is
            # better than the nev-th value: a loose tolerance does; if it finds a better pair,
            # that pair is dropped and the next pass looks for it at full tolerance.
            check = len(held) >= nev and p == 1
            pass_tol = max(tol, CHECK_TOL) if check else tol
            eps = _new_eps(mat, which, want, pass_tol * _scale(result, held, mat, seed, log), max_it, prefix)
            eps.setConvergenceTest(SLEPc.EPS.Conv.ABS)
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
        scale = max([abs(t[0]) for t in held + found] + [x for x in [result.norm_estimate] if np.isfinite(x)],
                    default=0.0) or 1.0
        if not relative and check:
            # |λ − θ| ≤ ‖r‖: a loose pair may hide a better eigenvalue only within its residual
            gained = sum(key(lam) - r < key(threshold) - 10 * tol * scale for lam, _, r in found)
            if gained:
                found = []
        else:
            gained = sum(key(lam) < key(threshold) - 10 * tol * scale
                         for lam, _, _ in found) if threshold is not None else len(found)
        merged = sorted(held + found, key=lambda t: key(t[0]))[:nev]
        line = (f"pass {p + 1}: {len(found)} new pairs, best {found[0][0]:.10g}" if found
                else f"pass {p + 1}: no new pair converged")
        result.pass_log.append(line)
        if log:
            log(line + f" ({earlier_matvecs + count() - start_matvecs} matvecs so far)")
        held = merged
        p += 1
        result.passes = p
        if relative and not found and max_passes > 1:
            want = nev  # all wanted pairs are zeros: the absolute passes find them
        elif gained and not found:
            want = 2 * gained  # the loose check pass saw better pairs: find them at full tolerance
        elif not found or gained == 0 or max_passes == 1:
            want = 0
        elif len(held) < nev:  # pairs the pass did not converge (zero eigenvalues after a relative pass)
            want = nev - len(held)
        else:
            want = 1 if p == 1 else min(nev, 2 * gained)
        if on_pass is not None:
            on_pass(Progress(np.array([t[0] for t in held]), [t[1] for t in held],
                             np.array([t[2] for t in held]), p, want, result.iterations,
                             earlier_matvecs + count() - start_matvecs, result.norm_estimate,
                             list(result.pass_log), result.solver))
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
    result.n_matvecs = earlier_matvecs + count() - start_matvecs
    result.wall_time = time.perf_counter() - t0
    return result


def _check_resume(resume: Progress, mat, nev: int) -> None:
    k = len(resume.values)
    if not (len(resume.vectors) == len(resume.residuals) == k <= nev):
        raise HessmpiError(f"cannot resume: the saved progress holds {k} values, {len(resume.vectors)} "
                           f"vectors and {len(resume.residuals)} residuals for nev={nev}")
    n = mat.getSize()[0]
    for v in resume.vectors:
        if v.getSize() != n:
            raise HessmpiError(f"cannot resume: a saved vector has {v.getSize()} entries, the operator {n} rows")
