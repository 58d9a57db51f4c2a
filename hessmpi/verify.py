"""Checks that a Problem's derivatives are what they claim, before any solve.

Finite differences of the gradient and of the HVP along a random direction for a
decreasing step ε = 0.5^k (central differences: the error must fall like ε² until
rounding takes over), the symmetry ratio 2|yᵀHx − xᵀHy| / (|yᵀHx| + |xᵀHy|), and
determinism (the same product twice). All functions are collective.

Leaky ReLU and max-pooling make the loss non-differentiable wherever a
pre-activation is exactly zero, which zero biases make common at a CNN's
initialisation; there finite differences measure the kink, not the code. `run_all`
therefore checks at θ plus a small seeded perturbation (`perturb`, relative to ‖θ‖/√n).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Check:
    name: str
    error: float
    tolerance: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.error) and self.error <= self.tolerance)


def _direction(n, seed):
    d = np.random.default_rng(seed).standard_normal(n)
    return d / np.linalg.norm(d)


def _both_sides(problem, theta, step):
    """((L, ∇L) at θ + step, (L, ∇L) at θ − step); the problem is left at θ."""
    problem.set_params(theta + step)
    plus = problem.loss_grad()
    problem.set_params(theta - step)
    minus = problem.loss_grad()
    problem.set_params(theta)
    return plus, minus


def gradient_check(problem, theta, seed=0, steps=range(4, 20)) -> Check:
    """Best relative error of (L(θ+εd) − L(θ−εd))/2ε against ∇L·d over ε = 0.5^k."""
    d = _direction(problem.n_params, seed)
    problem.set_params(theta)
    _, g = problem.loss_grad()
    exact = g @ d
    errors = []
    for k in steps:
        eps = 0.5 ** k
        (lp, _), (lm, _) = _both_sides(problem, theta, eps * d)
        errors.append(abs((lp - lm) / (2 * eps) - exact) / max(abs(exact), 1e-12))
    return Check("gradient vs finite differences", min(errors), _tol(problem),
                 f"∇L·d = {exact:.6e}; errors " + " ".join(f"{e:.1e}" for e in errors[::3]))


def hvp_check(problem, theta, seed=1, steps=range(4, 20)) -> Check:
    """Best relative error of (∇L(θ+εd) − ∇L(θ−εd))/2ε against H·d over ε = 0.5^k."""
    d = _direction(problem.n_params, seed)
    problem.set_params(theta)
    hd = problem.hessian.apply_full(d)
    errors = []
    for k in steps:
        eps = 0.5 ** k
        (_, gp), (_, gm) = _both_sides(problem, theta, eps * d)
        errors.append(np.linalg.norm((gp - gm) / (2 * eps) - hd) / max(np.linalg.norm(hd), 1e-12))
    return Check("HVP vs finite differences of the gradient", min(errors), _tol(problem),
                 f"‖Hd‖ = {np.linalg.norm(hd):.6e}; errors " + " ".join(f"{e:.1e}" for e in errors[::3]))


def symmetry_check(problem, theta, seed=2) -> Check:
    """2|yᵀHx − xᵀHy| / (|yᵀHx| + |xᵀHy|) for random x, y."""
    problem.set_params(theta)
    x, y = _direction(problem.n_params, seed), _direction(problem.n_params, seed + 100)
    a, b = y @ problem.hessian.apply_full(x), x @ problem.hessian.apply_full(y)
    ratio = 2 * abs(a - b) / max(abs(a) + abs(b), 1e-300)
    return Check("symmetry", ratio, 1e-5 if _single(problem) else 1e-12,
                 f"yᵀHx = {a:.6e}, xᵀHy = {b:.6e}")


def determinism_check(problem, theta, seed=3) -> Check:
    """max |Hx − Hx| / ‖Hx‖ for the same x applied twice."""
    problem.set_params(theta)
    x = _direction(problem.n_params, seed)
    first, second = problem.hessian.apply_full(x), problem.hessian.apply_full(x)
    diff = np.abs(first - second).max() / max(np.linalg.norm(first), 1e-300)
    return Check("determinism (same product twice)", diff, 0.0 if not _single(problem) else 1e-6)


def _single(problem) -> bool:
    return problem.curvature.dtype.name == "float32"


def _tol(problem) -> float:
    return 1e-2 if _single(problem) else 1e-6


def perturbed(theta, perturb, seed=0):
    """θ moved by perturb·(‖θ‖/√n or 1)·N(0, I): off the kinks of piecewise-linear layers."""
    n = theta.size
    scale = np.linalg.norm(theta) / np.sqrt(n) or 1.0
    return theta + perturb * scale * np.random.default_rng(seed + 1000).standard_normal(n)


def run_all(problem, theta, seed=0, perturb=1e-2) -> list[Check]:
    """Every check, in order, at perturbed(θ)."""
    theta = perturbed(theta, perturb, seed)
    return [gradient_check(problem, theta, seed), hvp_check(problem, theta, seed + 1),
            symmetry_check(problem, theta, seed + 2), determinism_check(problem, theta, seed + 3)]
