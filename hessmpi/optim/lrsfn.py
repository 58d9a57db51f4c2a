"""Low-rank saddle-free Newton (LRSFN), as in the experiment that motivated hessmpi.

Iteration k draws a gradient mini-batch and an independent Hessian mini-batch from
the seed (`training.batch_indices`, streams 0 and 1), computes the r eigenpairs of
largest magnitude (V, Λ) of the mini-batch Hessian of the objective, H_b + γR, with
SLEPc (`eigen.solve`, options prefix `lrsfn_`), and steps

    θ ← θ − α·[V(|Λ| + δ)⁻¹Vᵀ + δ⁻¹(I − VVᵀ)]·g_b

with g_b the mini-batch gradient of the objective, δ > 0 the damping and α the
learning rate. |Λ| makes the step descend along negative-curvature directions
instead of climbing them (saddle-free); δ⁻¹ scales the part of g_b outside span(V).
The eigenvectors stay distributed (PETSc Vecs): VᵀG is a local product and a sum.
"""

from __future__ import annotations

import numpy as np

from ..curvature.operator import sum_over_ranks
from ..curvature.petsc import shell_matrix
from ..errors import HessmpiError
from ..solvers import eigen
from .training import LocalBatches, Objective, batch_indices, check_finite, divergence_hint


class LowRankSaddleFreeNewton:
    """One LRSFN iteration per `step`; every random choice is a function of (seed, iteration)."""

    def __init__(self, objective: Objective, batches: LocalBatches, seed: int, rank: int = 40,
                 batch_size: int = 100, hessian_batch: int = 100, damping: float = 1.0,
                 learning_rate: float = 1.0, tol: float = 1e-2, prefix: str = "lrsfn_"):
        n_params = objective.problem.n_params
        if not 1 <= rank < n_params:
            raise HessmpiError(f"--rank must be between 1 and {n_params - 1}, got {rank}")
        if not damping > 0:
            raise HessmpiError(f"--damping must be positive (it divides the gradient outside the "
                               f"eigenvectors' span), got {damping}")
        if not learning_rate > 0:
            raise HessmpiError(f"--lr must be positive, got {learning_rate}")
        for name, b in (("--batch-size", batch_size), ("--hessian-batch", hessian_batch)):
            if not 1 <= b <= batches.n:
                raise HessmpiError(f"{name} must be between 1 and the {batches.n:,} training samples, got {b}")
        self.objective, self.batches, self.seed = objective, batches, seed
        self.rank, self.batch_size, self.hessian_batch = rank, batch_size, hessian_batch
        self.damping, self.learning_rate, self.tol, self.prefix = damping, learning_rate, tol, prefix
        self.hint = divergence_hint(objective, f"a smaller --lr (this run: {learning_rate:g})",
                                    "a larger --damping or --gamma")

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        pass

    def eigenpairs(self, theta: np.ndarray, iteration: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(Λ, V owned rows (r × n_local), HVPs): the top-|λ| pairs of the Hessian mini-batch objective."""
        obj, batches = self.objective, self.batches
        indices = batch_indices(self.seed, batches.n, self.hessian_batch, iteration, stream=1)
        op = obj.curvature(batches.hessian(theta, indices))
        mat = shell_matrix(op)
        try:
            res = eigen.solve(mat, self.rank, "magnitude", tol=self.tol, prefix=self.prefix,
                              seed=self.seed * 100003 + iteration, max_passes=1,
                              matvec_counter=lambda: op.n_matvecs)
            vectors = np.array([v.getArray(readonly=True).copy() for v in res.vectors]).reshape(
                len(res.vectors), op.n_local)
        finally:
            mat.destroy()
        obj.cost.hvps += res.n_matvecs
        obj.cost.sweeps += 2.0 * res.n_matvecs * self.hessian_batch / batches.n
        return res.values, vectors, res.n_matvecs

    def direction(self, g: np.ndarray, values: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """−[V(|Λ|+δ)⁻¹Vᵀ + δ⁻¹(I − VVᵀ)]g, the full vector on every rank (collective)."""
        op = self.objective.problem.hessian
        g_local = g[op.lo:op.hi]
        coeffs = sum_over_ranks(self.batches.comm, vectors @ g_local)
        d_local = -(vectors.T @ (coeffs / (np.abs(values) + self.damping))
                    + (g_local - vectors.T @ coeffs) / self.damping)
        return op.gather(d_local).copy()

    def step(self, theta: np.ndarray, iteration: int) -> tuple[np.ndarray, dict]:
        batches = self.batches
        g = batches.gradient(self.objective, theta,
                             batch_indices(self.seed, batches.n, self.batch_size, iteration, stream=0))
        check_finite(iteration + 1, "mini-batch gradient", g, hint=self.hint)
        values, vectors, hvps = self.eigenpairs(theta, iteration)
        check_finite(iteration + 1, "mini-batch Hessian's eigenvalues", values, hint=self.hint)
        d = self.direction(g, values, vectors)
        info = {"step_size": self.learning_rate, "eigen_hvps": hvps, "eigenvalues": values,
                "step_length": self.learning_rate * float(np.linalg.norm(d))}
        return theta + self.learning_rate * d, info
