"""Spectral density by stochastic Lanczos quadrature (SLQ) on a distributed symmetric operator.

For a unit probe v, m steps of Lanczos from v give a tridiagonal T (alphas on the
diagonal, betas beside it) whose eigenvalues θₖ and squared first eigenvector
components τₖ are the m-point Gauss quadrature of the measure μ_v = Σᵢ (vᵀuᵢ)² δ(λᵢ):
Σₖ τₖ f(θₖ) = vᵀ f(H) v exactly for every polynomial f of degree ≤ 2m − 1. For a
random probe with E[vvᵀ] = I/n (a normalised Rademacher or Gaussian vector) μ_v is
an unbiased estimate of the spectral measure (1/n) Σᵢ δ(λᵢ); averaging P probes and
smoothing each node with a Gaussian of width σ gives the density estimate
φ(t) = (1/P) Σ_p Σₖ τₚₖ N(t; θₚₖ, σ²), a probability density (it integrates to one;
n·φ counts eigenvalues per unit).

Lanczos runs in float64 with full reorthogonalization: SLEPc's BV holds the
distributed basis and orthogonalizes each new vector against all previous ones
(classical Gram-Schmidt with refinement by default; `-density_bv_orthog_type` etc.
change it). Probes are drawn in full from SeedSequence([seed mod 2⁶⁴, 0, p]) and
sliced to the rank's block, so the result does not depend on the rank count.

"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import runtime
from ..curvature.petsc import retraceable
from ..errors import NumericalError

PROBE_DISTRIBUTIONS = ("rademacher", "gaussian")
SLQ_STREAM = 0  # stream index of the SLQ probes in their SeedSequence (trace.py uses others)


def probe(n: int, seed: int, index: int, distribution: str = "rademacher", stream: int = SLQ_STREAM) -> np.ndarray:
    """Probe `index` as a full length-n vector (not normalised), the same on every rank:
    ±1 entries (Rademacher) or N(0, 1) entries, from SeedSequence([seed mod 2⁶⁴, stream, index])."""
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, stream, index])
    if distribution == "rademacher":
        return rng.integers(0, 2, n).astype(np.float64) * 2.0 - 1.0
    if distribution == "gaussian":
        return rng.standard_normal(n)
    raise ValueError(f"unknown probe distribution {distribution!r}: choose one of {', '.join(PROBE_DISTRIBUTIONS)}")


def lanczos(mat, start_local: np.ndarray, steps: int, prefix: str = "density_",
            breakdown: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, betas) of up to `steps` Lanczos steps on the symmetric PETSc matrix mat from
    the vector whose owned block is start_local (normalised here). Collective.

    Every new vector is orthogonalized against all earlier ones by SLEPc's BV. It stops
    early when the Krylov space is invariant (β below `breakdown` times the largest
    |α|, β seen): then T holds the probe's measure exactly. len(betas) = len(alphas) − 1.
    """
    SLEPc = runtime.slepc()

    n = mat.getSize()[0]
    steps = min(steps, n)
    comm = mat.getComm()
    w = mat.createVecLeft()
    bv = SLEPc.BV().create(comm=comm)
    bv.setSizesFromVec(w, steps)
    bv.setOptionsPrefix(prefix)
    bv.setFromOptions()
    alphas, betas = [], []
    try:
        w.getArray()[:] = start_local
        norm = w.norm()
        if norm == 0:
            raise ValueError("the Lanczos start vector is zero")
        w.scale(1.0 / norm)
        bv.insertVec(0, w)
        scale = 0.0
        for j in range(steps):
            q = bv.getColumn(j)
            try:
                mat.mult(q, w)
                alpha = w.dot(q)
            finally:
                bv.restoreColumn(j, q)
            if not math.isfinite(alpha):  # the same on every rank: all raise together
                raise NumericalError(f"Lanczos step {j + 1} gave a non-finite product: check the weights "
                                     f"(NaN?) and try float64")
            alphas.append(alpha)
            scale = max(scale, abs(alpha))
            if j == steps - 1:
                break
            bv.setActiveColumns(0, j + 1)
            beta, lindep = bv.orthogonalizeVec(w)  # w − Q(Qᵀw), refined: full reorthogonalization
            if lindep or beta <= breakdown * max(scale, beta):
                break
            scale = max(scale, beta)
            betas.append(beta)
            w.scale(1.0 / beta)
            bv.insertVec(j + 1, w)
    finally:
        bv.destroy()
        w.destroy()
    return np.array(alphas), np.array(betas)


def gauss_quadrature(alphas: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes θ ascending, weights τ summing to one) of the tridiagonal (alphas, betas)."""
    from scipy.linalg import eigh_tridiagonal

    if len(alphas) == 1:
        return np.array(alphas, dtype=float), np.ones(1)
    nodes, vectors = eigh_tridiagonal(alphas, betas)
    weights = vectors[0] ** 2
    return nodes, weights / weights.sum()


@dataclass
class Quadrature:
    """The Lanczos tridiagonals of P probes: everything SLQ needs, no HVP required to re-smooth.

    alphas (P, M) and betas (P, M − 1) are NaN-padded past each probe's `steps`.
    """

    n: int
    alphas: np.ndarray
    betas: np.ndarray
    steps: np.ndarray
    probe_seeds: np.ndarray  # (P, 3): the SeedSequence entropy [seed mod 2⁶⁴, stream, index]
    distribution: str = "rademacher"
    n_matvecs: int = 0
    _rules: list = field(default=None, repr=False)

    @property
    def n_probes(self) -> int:
        return len(self.steps)

    def tridiagonal(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        m = int(self.steps[p])
        return self.alphas[p, :m], self.betas[p, :m - 1]

    def rules(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per probe, the Gauss rule (nodes, weights)."""
        if self._rules is None:
            self._rules = [gauss_quadrature(*self.tridiagonal(p)) for p in range(self.n_probes)]
        return self._rules

    def nodes(self) -> np.ndarray:
        return np.concatenate([t for t, _ in self.rules()])

    def per_probe(self, f) -> np.ndarray:
        """Σₖ τₖ f(θₖ) for each probe: estimates of (1/n) tr f(H), exact for polynomials of
        degree ≤ 2·steps − 1."""
        return np.array([np.dot(w, f(t)) for t, w in self.rules()])

    def datasets(self, group: str = "density") -> dict:
        return {f"{group}/alphas": self.alphas, f"{group}/betas": self.betas,
                f"{group}/steps": self.steps, f"{group}/probe_seeds": self.probe_seeds}

    @classmethod
    def from_datasets(cls, datasets: dict, n: int, distribution: str, group: str = "density"):
        return cls(n, np.asarray(datasets[f"{group}/alphas"]), np.asarray(datasets[f"{group}/betas"]),
                   np.asarray(datasets[f"{group}/steps"]), np.asarray(datasets[f"{group}/probe_seeds"]),
                   distribution)


def slq(mat, n_probes: int, steps: int, seed: int = 0, distribution: str = "rademacher",
        matvec_counter=None, log=None, prefix: str = "density_", done: Quadrature | None = None,
        on_probe=None) -> Quadrature:
    """Lanczos from n_probes seeded random probes, `steps` steps each (fewer if the Krylov
    space closes). Collective; the same on every rank and at every rank count.

    done: the quadrature of the first probes (a checkpoint's), which this continues, its
    products counted in. on_probe(q, products) receives after each probe the quadrature
    of the probes done so far, and, if a stop request interrupts a probe, that quadrature
    with the probe's products (`petsc.retraceable`) before Interrupted goes on."""
    n = mat.getSize()[0]
    lo, hi = mat.getOwnershipRange()
    count = matvec_counter or (lambda: 0)
    start = count() - (done.n_matvecs if done is not None else 0)
    m = min(steps, n)
    alphas = np.full((n_probes, m), np.nan)
    betas = np.full((n_probes, max(m - 1, 0)), np.nan)
    used = np.zeros(n_probes, dtype=np.int64)
    seeds = np.array([[seed & 0xFFFFFFFFFFFFFFFF, SLQ_STREAM, p] for p in range(n_probes)], dtype=np.uint64)
    first = done.n_probes if done is not None else 0
    if first:
        alphas[:first], betas[:first], used[:first] = done.alphas, done.betas, done.steps

    def so_far(p):
        return Quadrature(n, alphas[:p].copy(), betas[:p].copy(), used[:p].copy(), seeds[:p], distribution,
                          count() - start)

    for p in range(first, n_probes):
        with retraceable(mat, on_probe and (lambda products: on_probe(so_far(p), products))):
            a, b = lanczos(mat, probe(n, seed, p, distribution)[lo:hi], m, prefix)
        alphas[p, :len(a)], betas[p, :len(b)], used[p] = a, b, len(a)
        if log:
            nodes, _ = gauss_quadrature(a, b)
            log(f"probe {p + 1}/{n_probes}: {len(a)} Lanczos steps, Ritz values "
                f"[{nodes[0]:.6g}, {nodes[-1]:.6g}] ({count() - start} products so far)")
        if on_probe:
            on_probe(so_far(p + 1), [])
    return Quadrature(n, alphas, betas, used, seeds, distribution, count() - start)


# ---------------------------------------------------------------- from the rules to numbers


@dataclass
class Stat:
    """A Monte Carlo estimate over probes: the mean and its standard error sd/√P (NaN if P = 1)."""

    value: float
    stderr: float

    @classmethod
    def of(cls, samples) -> "Stat":
        samples = np.asarray(samples, dtype=float)
        se = samples.std(ddof=1) / math.sqrt(len(samples)) if len(samples) > 1 else float("nan")
        return cls(float(samples.mean()), float(se))


def moments(q: Quadrature, k_max: int = 4) -> list[Stat]:
    """Estimates of the spectral moments (1/n) tr(Hᵏ), k = 1..k_max, with standard errors."""
    return [Stat.of(q.per_probe(lambda t, k=k: t ** k)) for k in range(1, k_max + 1)]


def spectral_range(q: Quadrature) -> tuple[float, float]:
    """(smallest, largest) Ritz value over all probes: inside [λ_min, λ_max]."""
    nodes = q.nodes()
    return float(nodes.min()), float(nodes.max())


def default_width(q: Quadrature, fraction: float = 0.005) -> float:
    """The default smoothing width σ: `fraction` of the span of the Ritz values."""
    lo, hi = spectral_range(q)
    return fraction * ((hi - lo) or max(abs(hi), 1.0))


def linear_grid(q: Quadrature, width: float, points: int = 2000, max_points: int = 200_001) -> np.ndarray:
    """An even grid from the smallest Ritz value − 6σ to the largest + 6σ, with at least
    5 points per σ (up to max_points), so that the smoothed density integrates to one."""
    lo, hi = spectral_range(q)
    span = hi - lo + 12 * width
    points = int(min(max(points, math.ceil(5 * span / width) + 1), max_points))
    return np.linspace(lo - 6 * width, hi + 6 * width, points)


def _gaussians(grid, centres, weights, width):
    values = np.zeros_like(grid)
    for c, w in zip(centres, weights):
        values += w * np.exp(-0.5 * ((grid - c) / width) ** 2)
    return values / (width * math.sqrt(2 * math.pi))


def smooth(q: Quadrature, grid: np.ndarray, width: float) -> np.ndarray:
    """φ(t) on grid: the probes' Gauss rules averaged, each node a Gaussian of width σ."""
    if width <= 0:
        raise ValueError(f"the smoothing width must be positive, got {width}")
    nodes = np.concatenate([t for t, _ in q.rules()])
    weights = np.concatenate([w for _, w in q.rules()]) / q.n_probes
    return _gaussians(grid, nodes, weights, width)


def zero_threshold(q: Quadrature, rel_tol: float) -> float:
    """ε = rel_tol · (largest |Ritz value|): nodes with |θ| ≤ ε count as zero eigenvalues."""
    return rel_tol * float(np.abs(q.nodes()).max())


@dataclass
class LogDensity:
    """The density of log10|λ| for λ > ε and for λ < −ε (mass per decade), and the mass
    of |λ| ≤ ε; pos, neg and zero_mass together carry all of the mass."""

    grid: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    zero_mass: float
    epsilon: float
    width: float  # in decades


def log_density(q: Quadrature, epsilon: float, width: float = 0.1, points: int = 600) -> LogDensity:
    """The bulk near zero on a log scale: each node with |θ| > ε becomes a Gaussian of
    width `width` decades at log10|θ|, on the side of its sign."""
    rules = q.rules()
    nodes = np.concatenate([t for t, _ in rules])
    weights = np.concatenate([w for _, w in rules]) / q.n_probes
    big = np.abs(nodes) > epsilon
    top = math.log10(max(np.abs(nodes).max(), epsilon * 10))
    grid = np.linspace(math.log10(epsilon) - 6 * width, top + 6 * width, points)
    u = np.log10(np.abs(nodes[big]))
    pos, w = nodes[big] > 0, weights[big]
    return LogDensity(grid, _gaussians(grid, u[pos], w[pos], width), _gaussians(grid, u[~pos], w[~pos], width),
                      float(weights[~big].sum()), epsilon, width)


@dataclass
class MassBelow:
    """The spectral mass below x: the Gauss-rule estimate with its standard error over
    probes, and the mean Chebyshev-Markov-Stieltjes bracket [lower, upper]."""

    x: float
    estimate: Stat
    lower: float
    upper: float


def mass_below(q: Quadrature, x: float) -> MassBelow:
    """The fraction of eigenvalues below x.

    Per probe, the Gauss rule puts Σ_{θₖ<x} τₖ below x. The Chebyshev-Markov-Stieltjes
    inequalities bound the probe's true mass μ_v((−∞, x)) between the sum over the
    nodes below x but the last, and the sum up to the first node ≥ x included; both
    are averaged over probes (each has the probes' Monte Carlo error too).
    """
    point, lower, upper = [], [], []
    for t, w in q.rules():
        j = int(np.searchsorted(t, x, side="left"))  # nodes t[:j] are < x
        c = np.concatenate(([0.0], np.cumsum(w)))
        point.append(c[j])
        lower.append(c[max(j - 1, 0)])
        upper.append(min(c[min(j + 1, len(t))], 1.0))
    return MassBelow(x, Stat.of(point), float(np.mean(lower)), float(np.mean(upper)))
