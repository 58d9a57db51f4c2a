"""Regularized Newton: inexact Newton-CG on the distributed curvature with a PETSc KSP.

Iteration k solves (H + γR) p = −∇F(θ_k) for the objective F = mean loss + γ/2·θᵀRθ
with a PETSc KSP whose operator is a shell matrix applying the distributed data
Hessian H (or the Gauss-Newton matrix, or either over a seeded mini-batch) plus γR
(`hessmpi.curvature.regularizers`), then moves along p with a backtracking (Armijo)
line search.

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
- Sub-sampled Newton (`hessian_batch` M): the curvature of iteration k is that of the
  k-th seeded subsample of M samples (each rank its share), a product costing 2M/N
  sweeps; `damping` σ adds σI to the step's matrix; `preconditioner="kronecker"`
  (softmax) preconditions the KSP with a Kronecker-factored approximation of H + γR + σI.
- Dynamic sample size Newton (`grow_from` n₀, `grow_factor` c; Byrd, Chin, Nocedal & Wu 2012):
  iteration k works on F_{n_k}, the objective over the first n_k = min(N, round(n₀·c^k))
  training samples only (F, ∇F, the line search, the curvature and its subsample), warm
  started from the previous θ; each rank uses its share of them. Data sums are kept per
  block of the schedule, so growing from n_{k−1} to n_k costs (n_k − n_{k−1})/N sweeps.
- Divergence (a non-finite F, ∇F or direction, a line search that finds only non-finite
  values) raises NumericalError on every rank, naming the iteration and what to try.

Why not TAO: PETSc TAO's `nls`/`ntr` drive this loop well, but they keep state that
petsc4py 3.18 can neither read nor set (NLS's Hessian perturbation, NTR's trust
radius, the Eisenstat–Walker history), so a checkpointed run cannot resume where it
stopped; the loop here is the hIPPYlib Newton-CG loop in a few lines, and the linear
algebra (CG, Steihaug–Toint CG, its negative-curvature test) is PETSc's.
"""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..curvature.operator import sum_over_ranks
from ..curvature.petsc import interruptible, shell_matrix
from ..errors import HessmpiError
from .training import (CURVATURES, Objective, PrefixObjective, batch_indices, check_finite, diverged,
                       divergence_hint)

PRECONDITIONERS = ("none", "kronecker")


def reason_name(code: int) -> str:
    """The PETSc name of a KSP converged reason (e.g. 5 → CONVERGED_CG_NEG_CURVE)."""
    reasons = runtime.petsc().KSP.ConvergedReason
    names = {int(getattr(reasons, name)): name for name in dir(reasons) if name.isupper()}
    return names.get(int(code), str(int(code)))


class NewtonCG:
    """Inexact Newton-CG with Armijo backtracking on an Objective; one `step` per iteration.

    eta_max and ew_alpha set the KSP tolerance (Eisenstat–Walker), armijo the sufficient-decrease
    constant c in F(θ + αp) ≤ F(θ) + c·α·∇Fᵀp, max_backtracks how often α is halved.
    curvature 'ggn' replaces the Hessian by the generalized Gauss-Newton matrix (positive
    semi-definite, so CG never meets negative curvature). With `batches` and
    hessian_batch, the curvature of each iteration is that of a seeded mini-batch
    (sub-sampled Newton: products cost hessian_batch/N of a full one; the gradient and
    the line search stay exact, so the limit is still the optimum of F). damping σ ≥ 0
    solves (C + γR + σI)p = −∇F instead (Levenberg–Marquardt; it shortens the step in the
    directions a small curvature batch does not see; the objective stays F). grow_from n₀ and
    grow_factor c make it a dynamic sample size method: iteration k minimizes the objective
    over the first n_k = min(N, round(n₀·c^k)) samples (`sample_size(k)`), the limit once
    n_k = N being again the optimum of F.
    """

    def __init__(self, objective: Objective, eta_max: float = 0.5, ew_alpha: float = 2.0,
                 armijo: float = 1e-4, max_backtracks: int = 20, ksp_max_it: int = 1000,
                 prefix: str = "newton_", curvature: str = "hessian", batches=None,
                 hessian_batch: int | None = None, seed: int = 0, damping: float = 0.0,
                 preconditioner: str = "none", grow_from: int | None = None, grow_factor: float = 4.0):
        if curvature not in CURVATURES:
            raise HessmpiError(f"unknown curvature {curvature!r}: choose one of {', '.join(CURVATURES)}")
        if preconditioner not in PRECONDITIONERS:
            raise HessmpiError(f"unknown preconditioner {preconditioner!r}: choose one of "
                               f"{', '.join(PRECONDITIONERS)}")
        if (hessian_batch is not None or preconditioner != "none" or grow_from is not None) and batches is None:
            raise ValueError("a Hessian subsample, a growing sample and the Kronecker preconditioner need `batches`")
        if hessian_batch is not None and not 1 <= hessian_batch <= batches.n:
            raise HessmpiError(f"--hessian-batch must be between 1 and the {batches.n:,} training samples, "
                               f"got {hessian_batch}")
        if not (np.isfinite(damping) and damping >= 0):
            raise HessmpiError(f"--damping must be a finite number >= 0 for --method newton, got {damping}")
        if grow_from is not None and not 1 <= grow_from <= batches.n:
            raise HessmpiError(f"--grow-from must be between 1 and the {batches.n:,} training samples, "
                               f"got {grow_from}")
        if not (np.isfinite(grow_factor) and grow_factor > 1):
            raise HessmpiError(f"--grow-factor must be a finite number > 1, got {grow_factor}")
        self.objective = objective
        self.hint = divergence_hint(objective, "a larger --gamma or --damping", "other --weights")
        self.eta_max, self.ew_alpha, self.ew_gamma = eta_max, ew_alpha, 0.9
        self.armijo, self.max_backtracks = armijo, max_backtracks
        self.curvature, self.batches, self.hessian_batch, self.seed = curvature, batches, hessian_batch, seed
        PETSc = runtime.petsc()
        problem = objective.problem
        self.full = problem.operator_for(curvature)
        self.damping = damping
        self._data, self.op = self.full, objective.curvature(self.full, damping)
        self.kronecker = KroneckerPreconditioner(objective, damping) if preconditioner == "kronecker" else None
        self.mat = shell_matrix(self.op)
        ksp = PETSc.KSP().create(comm=self.mat.getComm())
        ksp.setOptionsPrefix(prefix)
        ksp.setOperators(self.mat)
        ksp.setType(PETSc.KSP.Type.STCG)
        if self.kronecker is not None:
            ksp.getPC().setType(PETSc.PC.Type.PYTHON)
            ksp.getPC().setPythonContext(self.kronecker)
        else:
            ksp.getPC().setType(PETSc.PC.Type.NONE)
        ksp.setTolerances(max_it=ksp_max_it)
        ksp.setFromOptions()
        self.ksp = ksp
        self._x, self._b = self.mat.createVecs()
        self.previous = None  # (‖g‖, η) of the last solve
        self.grow_from, self.grow_factor = grow_from, grow_factor
        self.sampled = None
        if grow_from is not None:
            sizes, k = [], 0
            while not sizes or sizes[-1] < batches.n:
                sizes.append(self.sample_size(k))
                k += 1
            self.sampled = PrefixObjective(objective, batches, sizes)

    def sample_size(self, iteration: int) -> int:
        """n_k, the number of leading training samples iteration k uses: min(N, round(n₀·c^k))
        with a growing sample (--grow-from n₀, --grow-factor c), else N."""
        n = self.objective.problem.n_samples
        if self.grow_from is None or iteration * np.log(self.grow_factor) >= np.log(n / self.grow_from):
            return n
        return min(n, int(round(self.grow_from * self.grow_factor ** iteration)))

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
        """(the data-curvature operator at θ for this iteration, sweeps per product); sets up
        the preconditioner on the same samples (a forward pass over them, charged)."""
        n, n_k = self.objective.problem.n_samples, self.sample_size(iteration)
        if self.hessian_batch is None and n_k == n:
            indices = None
            self.objective.problem.set_params(theta)
            op, m = self.full, n
        else:
            if self.hessian_batch is None:  # all n_k samples of a growing sample
                indices = np.arange(n_k)
            else:  # a subsample of the first n_k
                indices = batch_indices(self.seed, n_k, min(self.hessian_batch, n_k), iteration, stream=2)
            m = len(indices)
            op = self.batches.hessian(theta, indices, self.curvature)
        if self.kronecker is not None:
            self.kronecker.update(theta, self.batches, indices, m, iteration,
                                  (n_k, self.sample_size(iteration - 1) if iteration else 0,
                                   self.sampled.boundaries if self.sampled else [n]))
        return op, 2.0 * m / n

    def direction(self, theta: np.ndarray, g: np.ndarray, iteration: int = 0) -> tuple[np.ndarray, dict]:
        """The inexact Newton direction at θ for gradient g (collective), and KSP statistics."""
        PETSc = runtime.petsc()
        cost = self.objective.cost
        data, sweeps_per_product = self.data_curvature(theta, iteration)
        if data is not self._data:  # the KSP's matrix multiplies by this iteration's curvature
            self._data, self.op = data, self.objective.curvature(data, self.damping)
            self.mat.getPythonContext().op = self.op
        op = self.op
        gnorm = float(np.linalg.norm(g))
        eta = self.forcing_term(gnorm)
        self.ksp.setTolerances(rtol=eta)
        self._b.getArray()[:] = -g[op.lo:op.hi]
        before = op.n_matvecs
        with interruptible(self.mat):
            self.ksp.solve(self._b, self._x)
        self.previous = (gnorm, eta)  # after the products: a step interrupted in them leaves the state as it was
        hvps = op.n_matvecs - before
        cost.hvps += hvps
        cost.sweeps += sweeps_per_product * hvps
        d = op.gather(self._x.getArray(readonly=True))
        info = {"ksp_iterations": self.ksp.getIterationNumber(), "ksp_reason": int(self.ksp.getConvergedReason()),
                "rtol": eta, "hvps": hvps, "fallback": False}
        overflow = info["ksp_reason"] == PETSc.KSP.ConvergedReason.DIVERGED_NANORINF  # in the products
        check_finite(iteration + 1, f"Newton direction (KSP {reason_name(info['ksp_reason'])})",
                     np.nan if overflow else d, hint=self.hint)
        if not float(g @ d) < 0.0:  # no descent direction: steepest descent
            d = -g
            info["fallback"] = True
        return d, info

    def step(self, theta: np.ndarray, iteration: int) -> tuple[np.ndarray, dict]:
        """θ_{k+1} = θ_k + α·p with α the first of 1, ½, ¼, … meeting the Armijo condition."""
        # For k > 0, F and ∇F at θ_k were paid for by the line search that accepted θ_k
        # (also when a resumed run recomputes them after a checkpoint).
        if self.sampled is None:
            value, g, _ = self.objective.value_grad(theta, count=iteration == 0)
        else:  # F and ∇F over the first n_k samples; those of n_{k−1} were paid by the line search
            n_k = self.sample_size(iteration)
            paid = self.sample_size(iteration - 1) if iteration else 0
            value, g, _ = self.sampled.value_grad(theta, n_k, paid)
        check_finite(iteration + 1, f"objective or its gradient at iterate {iteration}", value, g,
                     hint=self.hint)
        d, info = self.direction(theta, g, iteration)
        slope = float(g @ d)
        slack = 10 * np.finfo(float).eps * abs(value)  # rounding of F near the optimum
        alpha = 1.0
        for _ in range(self.max_backtracks + 1):
            trial = theta + alpha * d
            f_trial = (self.objective.value_grad(trial) if self.sampled is None
                       else self.sampled.value_grad(trial, n_k))[0]
            if np.isfinite(f_trial) and f_trial <= value + self.armijo * alpha * slope + slack:
                info.update(step_size=alpha, step_length=alpha * float(np.linalg.norm(d)))
                return trial, info
            alpha *= 0.5
        if not np.isfinite(f_trial):  # every trial, down to α = 2^−max_backtracks, overflowed
            raise diverged(iteration + 1, f"the objective is not finite along the Newton step even at "
                                          f"α = {2 * alpha:g}", self.hint)
        info.update(step_size=0.0, step_length=0.0,
                    failed=f"line search failed: no decrease after {self.max_backtracks} halvings")
        return theta, info

    def destroy(self) -> None:
        self.ksp.destroy()
        self.mat.destroy()


class KroneckerPreconditioner:
    """PETSc PC (type python) for the softmax model: applies P⁻¹ with

        P = S ⊗ Ā + γ·R_pix ⊗ I₁₀ + σI
        S = (1/N) Σᵢ xᵢxᵢᵀ,   Ā = (1/m) Σ_{i∈B} (diag(pᵢ) − pᵢpᵢᵀ)

    with S the pixel second moments of all N training images (independent of θ: computed
    once, charged one sweep), Ā over the m samples B of the iteration's curvature (pᵢ the
    softmax probabilities at θ; charged m/N sweeps), R = R_pix ⊗ I₁₀ the regularizer
    (R_pix = I or LᵀL). The data Hessian is (1/N) Σᵢ xᵢxᵢᵀ ⊗ (diag(pᵢ) − pᵢpᵢᵀ); P replaces
    the mean of the products by the product of the means (K-FAC's approximation, exact
    where all pᵢ are equal, as at θ = 0). With Ā = QΛQᵀ, P⁻¹ acts on W (pixels × 10) as
    W ↦ [(λ_c·S + γR_pix + σI)⁻¹ (WQ)_c]_c Qᵀ: ten Cholesky factorizations of 784 × 784
    per Newton iteration, replicated on every rank.
    """

    def __init__(self, objective: Objective, shift: float = 0.0):
        from ..curvature import regularizers
        from ..solvers.rank import closed_form

        if not closed_form(objective.problem):
            raise HessmpiError("--preconditioner kronecker is built for the softmax model; use "
                               "--preconditioner none for the cnn")
        side, _ = regularizers.image_side(objective.problem.model)
        if objective.regularization == "l2":
            self.r_pix = np.eye(side * side)
        else:
            lap = regularizers.laplacian_matrix(side)
            self.r_pix = lap.T @ lap
        self.objective, self.shift = objective, shift
        self.gather = objective.problem.hessian.gather
        self.lo, self.hi = objective.problem.hessian.lo, objective.problem.hessian.hi
        self.factors, self.Q, self.S = None, None, None
        self.blocks = []  # Σxxᵀ over the blocks of a growing sample, summed over ranks

    def update(self, theta: np.ndarray, batches, indices: np.ndarray | None, m: int, iteration: int,
               prefix: tuple | None = None) -> None:
        """Factor P at θ with Ā over the samples `indices` (None: all), m of them (collective).
        S is computed by the first call of this process and charged in iteration 0 (a resumed
        run paid for it then); with a growing sample, prefix = (n_k, n_{k−1}, the schedule's
        block ends) and S is over the first n_k samples, summed block by block (so a resumed
        run gets the same S bit for bit), the new samples charged in the iteration they join."""
        import scipy.linalg

        cost = self.objective.cost
        d = self.r_pix.shape[0]
        n_k, paid, boundaries = prefix or (batches.n, 0, [batches.n])
        if n_k == batches.n and len(boundaries) == 1:  # all N from the start
            if self.S is None:  # once per process: a resumed run has paid for it already
                X = batches.features(None)
                self.S = sum_over_ranks(self.objective.comm, X.T @ X) / batches.n
                cost.sweeps += 1.0 if iteration == 0 else 0.0
        else:  # a growing sample: S over the first n_k samples, summed block by block
            blocks = boundaries.index(n_k) + 1
            if len(self.blocks) < blocks:
                for j in range(len(self.blocks), blocks):
                    lo = boundaries[j - 1] if j else 0
                    X = batches.features(np.arange(lo, boundaries[j]))
                    self.blocks.append(sum_over_ranks(self.objective.comm, X.T @ X))
                self.S = sum(self.blocks[1:blocks], self.blocks[0].copy()) / n_k
            cost.sweeps += (n_k - paid) / batches.n  # the samples new in this iteration
        X = batches.features(indices)
        Z = X @ theta.reshape(X.shape[1], -1)
        P = np.exp(Z - Z.max(axis=1, keepdims=True))
        P /= P.sum(axis=1, keepdims=True)
        A = sum_over_ranks(self.objective.comm, np.diag(P.sum(axis=0)) - P.T @ P) / m
        cost.sweeps += m / batches.n
        S = self.S
        lam, self.Q = np.linalg.eigh(A)
        gamma = self.objective.gamma
        base = gamma * self.r_pix + self.shift * np.eye(d)
        jitter = 1e-12 * max(np.trace(S), 1.0)
        self.factors = [scipy.linalg.cho_factor(max(l, 0.0) * S + base + jitter * np.eye(d)) for l in lam]

    def apply(self, pc, x, y) -> None:
        import scipy.linalg

        W = self.gather(x.getArray(readonly=True)).reshape(-1, len(self.factors)) @ self.Q
        for c, factor in enumerate(self.factors):
            W[:, c] = scipy.linalg.cho_solve(factor, W[:, c])
        y.getArray()[:] = (W @ self.Q.T).ravel()[self.lo:self.hi]
