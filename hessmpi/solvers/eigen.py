"""SLEPc eigen solves of a symmetric shell matrix, returning every copy of repeated eigenvalues.

A single-vector Krylov method sees one direction of each eigenspace from its start
vector, so it can silently return fewer copies of a repeated eigenvalue than there
are (the softmax Hessian at W = 0 has every nonzero eigenvalue 9 times). We solve in
*passes*, all alike: a pass deflates every pair converged so far
(EPSSetDeflationSpace), starts from a fresh random vector and converges pairs at full
tolerance; its pairs join the held ones and the best `nev` are the result. A pass
after the first stops early once nothing better is in sight: its best Ritz value not
yet converged, widened by its residual (|λ − θ| ≤ ‖r‖), cannot beat the nev-th best
pair held. The solve ends after a pass that found nothing better than the nev-th
value held before it, which is the post-check that no copy is missing; the first
check asks for one pair, a pass that found k missing pairs is followed by one asking
for 2k. No product is thrown away: whatever a pass converges is kept.

SLEPc's default convergence test is relative to |λ|, which a zero eigenvalue never
passes, and zero eigenvalues are the rule in a Hessian: the smallest ones, and the
largest ones too once nev exceeds the rank or the matrix is negative semi-definite.
So the test is absolute, ‖Hx − λx‖ ≤ tol·‖H‖₂ (SLEPc's EPS_CONV_ABS), with ‖H‖₂
estimated first by a loose largest-magnitude solve (13–16 products for the CNN).
For `which="largest"` that estimate is skipped (bench/eigen_cost.py): the first pass
uses SLEPc's relative test ‖Hx − λx‖ ≤ tol·|λ|, which implies the absolute one
(|λ| ≤ ‖H‖₂) and is what users check; it also stops when the wanted pairs still
unconverged are zero eigenvalues (converged in the absolute sense, never relatively),
and the later passes use the absolute test scaled by |λ₁| held. The residuals returned
are the true ‖Hx − λx‖, one product per returned pair at the end (the held pairs
carry SLEPc's estimates until then; a caller that multiplies the pairs anyway, as the
error bars do, asks for the estimates and computes the true ones itself). Options are
read with a prefix (`-hess_eps_type lanczos -hess_eps_tol 1e-10`).
A long solve can be continued in a new process: `solve` reports a `Progress` after
every pass and accepts one back (the spectrum script checkpoints them to a file). A solve
stopped inside a pass (a stop request, `hessmpi.stop`) reports the products that pass
had made; given back, they let the pass retrace its steps without computing them again
(`petsc.ShellContext.replay`), so an interrupted and resumed solve costs one product more
than an uninterrupted one and, on as many ranks, gives the same result bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .. import runtime
from ..curvature.petsc import interruptible, replay, retraceable
from ..errors import HessmpiError, Interrupted

WHICH = ("largest", "smallest", "magnitude")


def _which(which: str):
    SLEPc = runtime.slepc()
    return {"largest": SLEPc.EPS.Which.LARGEST_REAL, "smallest": SLEPc.EPS.Which.SMALLEST_REAL,
            "magnitude": SLEPc.EPS.Which.LARGEST_MAGNITUDE}[which]


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

    values/vectors/residuals are the pairs held (best first: every pair converged so
    far, which the next pass deflates, so possibly more than nev; vectors are PETSc Vecs
    laid out like the matrix; residuals SLEPc's estimates), passes the passes done,
    next_want the pairs the next pass asks for (0: the solve has finished). The counters
    cover every pass. replay: the products the next pass had made when it was
    interrupted ((digest of x, this rank's rows of H·x), in order; see
    petsc.ShellContext), which it retraces instead of computing them again.
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
    replay: list = field(default_factory=list)


def _order_key(which: str):
    if which == "largest":
        return lambda lam: -lam
    if which == "smallest":
        return lambda lam: lam
    return lambda lam: -abs(lam)


def _random_vec(mat, seed: int):
    """A unit random vector that does not depend on the rank count (drawn in full, then sliced)."""
    n = mat.getSize()[1]
    full = np.random.default_rng(seed).standard_normal(n)
    v = mat.createVecRight()
    lo, hi = v.getOwnershipRange()
    v.getArray()[:] = full[lo:hi] / np.linalg.norm(full)
    return v


def _new_eps(mat, which, nev, tol, max_it, prefix):
    SLEPc = runtime.slepc()
    eps = SLEPc.EPS().create(comm=mat.getComm())
    eps.setOperators(mat)
    eps.setProblemType(SLEPc.EPS.ProblemType.HEP)
    eps.setWhichEigenpairs(_which(which))
    eps.setDimensions(nev)
    eps.setTolerances(tol, max_it)
    eps.setOptionsPrefix(prefix)
    return eps


def norm_estimate(mat, seed: int = 0, prefix: str = "hess_norm_") -> float:
    """‖H‖₂ to about three digits: a loose SLEPc solve for the largest-magnitude eigenvalue."""
    eps = _new_eps(mat, "magnitude", 1, 1e-3, None, prefix)
    try:
        eps.setInitialSpace([_random_vec(mat, seed + 104729)])
        eps.setFromOptions()
        with interruptible(mat):
            eps.solve()
        return abs(eps.getEigenvalue(0).real) if eps.getConverged() else 0.0
    finally:
        eps.destroy()


# A residual bounds the distance from a Ritz value to *some* eigenvalue, not to the largest
# one left, so "nothing better in sight" is a verdict on the Krylov space seen so far: in a
# small one the top Ritz value can sit in the rest of the spectrum, under a copy not yet
# seen. Taken from the third restart on (16 products with a basis of 8), it found a copy
# lying 2%, 0.5% and 0.1% above the rest of the spectrum in 20 of 20 random matrices each,
# where from the first restart on (8 products) it missed 0, 2 and 2 of them, for about
# 10 products more per solve (test_a_copy_next_to_the_bulk_is_found).
VERDICT_RESTARTS = 3


class _Watch:
    """Monitor and stopping test of one pass. SLEPc calls the monitor after each restart
    and the stopping test before the next one, so a decision takes effect one restart late.

    It stops the pass (CONVERGED_USER) when
      "nothing better": from the VERDICT_RESTARTS-th restart on, the best Ritz value not yet
        converged, widened by its residual (|λ − θ| ≤ ‖r‖), cannot beat the nev-th best of
        the pairs held and converged so far: no missing pair is in sight, the pass has done
        its job as a check;
      "zeros" (relative test only): every wanted pair not yet converged is a zero eigenvalue,
        |θ| ≤ √tol·max|θ| with residual ≤ tol·max|θ|, which a relative test never accepts.
    """

    def __init__(self, eps, want, nev, held_values, key, margin, relative, tol):
        self.want, self.nev, self.held, self.key = want, nev, held_values, key
        self.margin, self.relative, self.tol = margin, relative, tol
        self.stop = None
        self.shell = None  # the matrix's ShellContext while it solves: a stop request ends the pass
        eps.setMonitor(self.monitor)
        eps.setStoppingTest(self.stopping)

    def monitor(self, eps, its, nconv, eig, err):
        theta = [e.real for e in eig]
        res = [err[i] * abs(theta[i]) if self.relative else err[i] for i in range(len(theta))]
        if nconv < len(theta):
            values = sorted(self.held + theta[:nconv], key=self.key)
            if (its >= VERDICT_RESTARTS and len(values) >= self.nev and
                    self.key(theta[nconv]) - res[nconv] >= self.key(values[self.nev - 1]) - self.margin):
                self.stop = "nothing better"
        if self.relative:
            k = min(self.want, len(theta))
            top = max((abs(t) for t in theta), default=0.0)  # every Ritz value: the wanted may all be 0
            if nconv < k and top > 0 and all(res[i] <= self.tol * top and abs(theta[i]) <= np.sqrt(self.tol) * top
                                             for i in range(nconv, k)):
                self.stop = "zeros"

    def stopping(self, eps, its, max_it, nconv, nev):
        SLEPc = runtime.slepc()
        if self.shell is not None and self.shell.interrupted is not None:
            return SLEPc.EPS.ConvergedReason.CONVERGED_USER  # its products are zeros now
        if nconv >= nev:
            return SLEPc.EPS.ConvergedReason.CONVERGED_TOL
        if its >= max_it:
            return SLEPc.EPS.ConvergedReason.DIVERGED_ITS
        if self.stop:
            return SLEPc.EPS.ConvergedReason.CONVERGED_USER
        return SLEPc.EPS.ConvergedReason.ITERATING


# Krylov-Schur's basis in the passes after the first: want + this (SLEPc's default is
# max(2·want, want + 15)). A small basis restarts often, and the stopping test of a
# check pass only sees the Ritz values at restarts. Not smaller: a check pass of 4
# vectors proved the CNN's top 10 complete in 6 products instead of 16, but missed a
# copy lying just above the rest of the spectrum in 5–7 of 20 random matrices where 8
# vectors missed 0–2 (test_a_copy_next_to_the_bulk_is_found).
LATER_NCV_EXTRA = 7


def _residual(mat, lam: float, v) -> float:
    """‖Hv − λv‖ (one product)."""
    hv = mat.createVecLeft()
    mat.mult(v, hv)
    hv.axpy(-lam, v)
    r = hv.norm()
    hv.destroy()
    return r


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


def solve(mat, nev: int, which: str = "largest", tol: float = 1e-8,
          max_it: int | None = None, prefix: str = "hess_", seed: int = 0,
          max_passes: int = 20, matvec_counter=None, log=None,
          on_pass=None, resume: Progress | None = None, start: list | None = None,
          ncv: int | None = None, true_residuals: bool = True) -> EigenResult:
    """The nev best eigenpairs of the symmetric matrix mat for `which`, every copy included.

    tol is the residual tolerance relative to ‖H‖₂ (for which="largest", relative to
    |λ| in the first pass and to |λ₁| after it: stricter, see the module notes); options under `prefix` override the
    defaults set here. `matvec_counter()` returns the operator's product count so that
    the result can report what the solve cost. log(str) receives one line per pass.
    With max_passes=1 the check pass is skipped; otherwise a solve whose last allowed
    pass still found missing copies raises HessmpiError. The residuals returned are the
    true ‖Hx − λx‖ (one product per pair, counted); with true_residuals=False, SLEPc's
    estimates, for a caller that multiplies the pairs anyway (the error bars).

    Restart: on_pass(Progress) is called on every rank after each pass (a collective
    point); given back as `resume` with the same arguments, in a new process too, that
    Progress continues the solve where it stood, and the result equals the
    uninterrupted solve's (the same passes follow from the same held pairs and seeds). The result's n_matvecs,
    iterations and passes then include the resumed passes; wall_time is this call's.
    A stop request raises Interrupted from inside a pass; on_pass first receives the
    progress with that pass's products (`replay`; recorded only when on_pass is given and
    mat is a `petsc.shell_matrix`), and the resumed solve retraces them.

    start: Vecs that span the first pass's initial space instead of a random vector (a warm
    start from eigenvectors of a nearby operator). ncv: the first pass's basis size (SLEPc's
    default when None): each restart costs about ncv − nev products.
    """
    SLEPc = runtime.slepc()
    n = mat.getSize()[0]
    if which not in WHICH:
        raise HessmpiError(f"unknown --which {which!r}: choose one of {', '.join(WHICH)}")
    if not 1 <= nev < n:
        raise HessmpiError(f"--nev must be between 1 and {n - 1} (the operator has {n} rows), got {nev}")
    key = _order_key(which)
    count = matvec_counter or (lambda: 0)
    start_matvecs, t0 = count(), time.perf_counter()
    result = EigenResult(np.empty(0), [], np.empty(0))
    held: list  # (value, Vec, residual), best first: every pair converged so far
    if resume is not None:
        _check_resume(resume, mat)
        held = list(zip(np.asarray(resume.values).tolist(), resume.vectors, np.asarray(resume.residuals).tolist()))
        p, want = resume.passes, resume.next_want
        replay(mat, resume.replay)
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

    def progress(passes, next_want, pairs, products=()):
        return Progress(np.array([t[0] for t in pairs]), [t[1] for t in pairs], np.array([t[2] for t in pairs]),
                        passes, next_want, result.iterations, earlier_matvecs + count() - start_matvecs,
                        result.norm_estimate, list(result.pass_log), result.solver, list(products))

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
        else:
            eps = _new_eps(mat, which, want, tol * _scale(result, held, mat, seed, log), max_it, prefix)
            eps.setConvergenceTest(SLEPc.EPS.Conv.ABS)
            eps.setDimensions(want, min(want + LATER_NCV_EXTRA, n - len(held)))
        if ncv and p == 0:
            eps.setDimensions(want, min(max(ncv, want + 1), n))
        scale = max([abs(t[0]) for t in held] + [x for x in [result.norm_estimate] if np.isfinite(x)],
                    default=0.0) or 1.0
        margin = 10 * tol * scale  # a pair beats another only by more than this
        watch = _Watch(eps, want, nev, [t[0] for t in held], key, margin, relative, tol)
        if held:
            eps.setDeflationSpace([v for _, v, _ in held])
        eps.setInitialSpace(start if start and p == 0 else [_random_vec(mat, seed * 7919 + p)])
        eps.setFromOptions()
        try:
            with retraceable(mat, on_pass and (lambda products: on_pass(progress(p, want, held, products)))):
                with interruptible(mat) as watch.shell:
                    eps.solve()
        except Interrupted:
            eps.destroy()
            raise
        result.solver = eps.getType()
        result.iterations += eps.getIterationNumber()
        stopped = watch.stop if eps.getConvergedReason() == SLEPc.EPS.ConvergedReason.CONVERGED_USER else None
        found = []
        for i in range(eps.getConverged()):
            v = mat.createVecRight()
            lam = eps.getEigenpair(i, v).real
            estimate = eps.getErrorEstimate(i)  # SLEPc's, relative to |λ| under the relative test
            found.append((lam, v, estimate * abs(lam) if relative else estimate))
        eps.destroy()
        threshold = held[nev - 1][0] if len(held) >= nev else None  # the nev-th value before this pass
        gained = (sum(key(lam) < key(threshold) - margin for lam, _, _ in found) if threshold is not None
                  else len(found))
        held = sorted(held + found, key=lambda t: key(t[0]))
        line = (f"pass {p + 1}: {len(found)} new pairs, best {found[0][0]:.10g}" if found
                else f"pass {p + 1}: no new pair converged")
        if stopped == "nothing better":
            line += ", then nothing better in sight"
        result.pass_log.append(line)
        if log:
            log(line + f" ({earlier_matvecs + count() - start_matvecs} matvecs so far)")
        p += 1
        result.passes = p
        if max_passes == 1:
            want = 0
        elif relative and (not found or stopped == "zeros"):
            want = nev  # the wanted pairs left are zeros: the absolute passes find them
        elif not found or gained == 0:
            want = 0  # nothing beats the nev-th pair held before this pass: no copy is missing
        else:
            # this pass found missing pairs, there may be more: after the first pass a check
            # for one (it stops early when nothing better is in sight), then twice what was found
            want = max(nev - len(held), 1 if p == 1 else min(nev, 2 * gained))
        if on_pass is not None:
            on_pass(progress(p, want, held))
    held = held[:nev]
    if true_residuals:
        with retraceable(mat, on_pass and (lambda products: on_pass(progress(p, 0, held, products)))):
            held = [(lam, v, _residual(mat, lam, v)) for lam, v, _ in held]  # one product each
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


def _check_resume(resume: Progress, mat) -> None:
    k = len(resume.values)
    if not len(resume.vectors) == len(resume.residuals) == k:
        raise HessmpiError(f"cannot resume: the saved progress holds {k} values, {len(resume.vectors)} "
                           f"vectors and {len(resume.residuals)} residuals")
    n = mat.getSize()[0]
    for v in resume.vectors:
        if v.getSize() != n:
            raise HessmpiError(f"cannot resume: a saved vector has {v.getSize()} entries, the operator {n} rows")
