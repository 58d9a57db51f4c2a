"""Regularized Newton: inexact Newton-CG on the distributed curvature with a PETSc KSP.

Iteration k solves (H + γR) p = −∇F(θ_k) for the objective F = mean loss + γ/2·θᵀRθ
with a PETSc KSP whose operator is a shell matrix applying the distributed data
Hessian H (or the Gauss-Newton matrix, or either over a seeded mini-batch) plus γR
(the AIJ matrix of `hessmpi.regularize`), then moves along p with a backtracking
(Armijo) line search.

- Krylov solver: options prefix `newton_` (`-newton_ksp_type`, `-newton_ksp_monitor`,
  `-newton_ksp_max_it`, `-newton_ksp_cg_radius`, …). The default is PETSc's Steihaug–Toint
  CG (`stcg`) without a radius: CG that stops at the first direction of negative
  curvature and returns the iterate reached so far (KSP_CONVERGED_CG_NEG_CURVE), the
  safeguard for the indefinite CNN Hessian. If the direction is not a descent direction
  (negative curvature at the very first step leaves it zero), the step is −∇F.
- Inexact solves: the KSP relative tolerance is the Eisenstat–Walker forcing term
  (choice 2, with their safeguard): η₀ = η_max, then
  η_k = min(η_max, max(γ_ew·(‖g_k‖/‖g_{k−1}‖)^α, γ_ew·η_{k−1}^α if that exceeds 0.1)),
  γ_ew = 0.9. Early Newton steps cost few Hessian-vector products; α = 2 gives
  quadratic local convergence. The state (‖g_{k−1}‖, η_{k−1}) is checkpointed, so a
  resumed run makes exactly the steps of an uninterrupted one.

Why not TAO: PETSc TAO's `nls`/`ntr` drive this loop well, but they keep state that
petsc4py 3.18 can neither read nor set (NLS's Hessian perturbation, NTR's trust
radius, the Eisenstat–Walker history), so a checkpointed run cannot resume where it
stopped; the loop here is the hIPPYlib Newton-CG loop in a few lines, and the linear
algebra (CG, Steihaug–Toint CG, its negative-curvature test) is PETSc's.
"""

from __future__ import annotations

import numpy as np
from petsc4py import PETSc

from .errors import HessmpiError
from .operator import ggn_operator
from .petsc import shell_matrix
from .training import CURVATURES, Objective, RegularizedOperator, batch_indices

KSP_REASONS = {int(getattr(PETSc.KSP.ConvergedReason, name)): name
               for name in dir(PETSc.KSP.ConvergedReason) if name.isupper()}


def reason_name(code: int) -> str:
    """The PETSc name of a KSP converged reason (e.g. 5 → CONVERGED_CG_NEG_CURVE)."""
    return KSP_REASONS.get(int(code), str(int(code)))


class NewtonCG:
    """Inexact Newton-CG with Armijo backtracking on an Objective; one `step` per iteration.

    eta_max and ew_alpha set the KSP tolerance (Eisenstat–Walker), armijo the sufficient-decrease
    constant c in F(θ + αp) ≤ F(θ) + c·α·∇Fᵀp, max_backtracks how often α is halved.
    curvature 'ggn' replaces the Hessian by the generalized Gauss-Newton matrix (positive
    semi-definite, so CG never meets negative curvature). With `batches` and
    hessian_batch, the curvature of each iteration is that of a seeded mini-batch
    (sub-sampled Newton: products cost hessian_batch/N of a full one; the gradient and
    the line search stay exact, so the limit is still the optimum of F).
    """

    def __init__(self, objective: Objective, eta_max: float = 0.5, ew_alpha: float = 2.0,
                 armijo: float = 1e-4, max_backtracks: int = 20, ksp_max_it: int = 1000,
                 prefix: str = "newton_", curvature: str = "hessian", batches=None,
                 hessian_batch: int | None = None, seed: int = 0):
        if curvature not in CURVATURES:
            raise HessmpiError(f"unknown curvature {curvature!r}: choose one of {', '.join(CURVATURES)}")
        if batches is not None and not 1 <= (hessian_batch or 0) <= batches.n:
            raise HessmpiError(f"--hessian-batch must be between 1 and the {batches.n:,} training samples, "
                               f"got {hessian_batch}")
        self.objective = objective
        self.eta_max, self.ew_alpha, self.ew_gamma = eta_max, ew_alpha, 0.9
        self.armijo, self.max_backtracks = armijo, max_backtracks
        self.curvature, self.batches, self.hessian_batch, self.seed = curvature, batches, hessian_batch, seed
        problem = objective.problem
        self.full = (problem.hessian if curvature == "hessian"
                     else ggn_operator(problem.curvature, problem.n_samples, problem.comm))
        self.op = RegularizedOperator(self.full, objective.R, objective.gamma)
        self.mat = shell_matrix(self.op)
        ksp = PETSc.KSP().create(comm=self.mat.getComm())
        ksp.setOptionsPrefix(prefix)
        ksp.setOperators(self.mat)
        ksp.setType(PETSc.KSP.Type.STCG)
        ksp.getPC().setType(PETSc.PC.Type.NONE)
        ksp.setTolerances(max_it=ksp_max_it)
        ksp.setFromOptions()
        self.ksp = ksp
        self._x, self._b = self.mat.createVecs()
        self.previous = None  # (‖g‖, η) of the last solve

    def state(self) -> dict:
        return {"forcing": np.array(self.previous if self.previous else (np.nan, np.nan))}

    def restore(self, state: dict) -> None:
        gnorm, eta = map(float, state["forcing"])
        self.previous = None if np.isnan(gnorm) else (gnorm, eta)

    def forcing_term(self, gnorm: float) -> float:
        """η_k, the KSP relative tolerance of this iteration (Eisenstat–Walker choice 2)."""
        if self.previous is None:
            return self.eta_max
        g_prev, eta_prev = self.previous
        eta = self.ew_gamma * (gnorm / g_prev) ** self.ew_alpha
        floor = self.ew_gamma * eta_prev ** self.ew_alpha
        if floor > 0.1:
            eta = max(eta, floor)
        return min(self.eta_max, eta)

    def data_curvature(self, theta: np.ndarray, iteration: int):
        """(the data-curvature operator at θ for this iteration, sweeps per product)."""
        if self.batches is None:
            self.objective.problem.set_params(theta)
            return self.full, 2.0
        indices = batch_indices(self.seed, self.batches.n, self.hessian_batch, iteration, stream=2)
        return (self.batches.hessian(theta, indices, self.curvature),
                2.0 * self.hessian_batch / self.batches.n)

    def direction(self, theta: np.ndarray, g: np.ndarray, iteration: int = 0) -> tuple[np.ndarray, dict]:
        """The inexact Newton direction at θ for gradient g (collective), and KSP statistics."""
        op, cost = self.op, self.objective.cost
        op.hessian, sweeps_per_product = self.data_curvature(theta, iteration)
        gnorm = float(np.linalg.norm(g))
        eta = self.forcing_term(gnorm)
        self.previous = (gnorm, eta)
        self.ksp.setTolerances(rtol=eta)
        self._b.getArray()[:] = -g[op.lo:op.hi]
        before = op.n_matvecs
        self.ksp.solve(self._b, self._x)
        hvps = op.n_matvecs - before
        cost.hvps += hvps
        cost.sweeps += sweeps_per_product * hvps
        d = op.hessian.gather(self._x.getArray(readonly=True)).copy()
        info = {"ksp_iterations": self.ksp.getIterationNumber(), "ksp_reason": int(self.ksp.getConvergedReason()),
                "rtol": eta, "hvps": hvps, "fallback": False}
        if not float(g @ d) < 0.0:  # no descent direction (or NaN): steepest descent
            d = -g
            info["fallback"] = True
        return d, info

    def step(self, theta: np.ndarray, iteration: int) -> tuple[np.ndarray, dict]:
        """θ_{k+1} = θ_k + α·p with α the first of 1, ½, ¼, … meeting the Armijo condition."""
        # For k > 0, F and ∇F at θ_k were paid for by the line search that accepted θ_k
        # (also when a resumed run recomputes them after a checkpoint).
        value, g, _ = self.objective.value_grad(theta, count=iteration == 0)
        d, info = self.direction(theta, g, iteration)
        slope = float(g @ d)
        slack = 10 * np.finfo(float).eps * abs(value)  # rounding of F near the optimum
        alpha = 1.0
        for _ in range(self.max_backtracks + 1):
            trial = theta + alpha * d
            f_trial = self.objective.value_grad(trial)[0]
            if np.isfinite(f_trial) and f_trial <= value + self.armijo * alpha * slope + slack:
                info.update(step_size=alpha, step_length=alpha * float(np.linalg.norm(d)))
                return trial, info
            alpha *= 0.5
        info.update(step_size=0.0, step_length=0.0,
                    failed=f"line search failed: no decrease after {self.max_backtracks} halvings")
        return theta, info

    def destroy(self) -> None:
        self.ksp.destroy()
        self.mat.destroy()
