"""The spectral density and trace of a curvature operator: `spectral_density`, and `resmooth` of a stored one.

`spectral_density` runs stochastic Lanczos quadrature (`slq`: Lanczos in float64 with full
reorthogonalization from seeded random probes) and Hutch++ (`trace`), and summarizes
them: the smoothed density and its log-scale view of the bulk near zero, the spectral
moments, the mass below zero, the trace (Hutchinson over the same probes, and Hutch++)
and the Frobenius norm, each with a standard error. The tridiagonals are kept, so
`resmooth` can redraw the density with another width without a single new product.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .. import results, stop
from ..errors import HessmpiError, Interrupted
from . import slq, trace

MOMENTS = 4
PROBE_DISTRIBUTIONS = slq.PROBE_DISTRIBUTIONS


@dataclass
class Smoothing:
    """How the density is drawn from the quadrature: width σ (None: 1/200 of the span of the
    Ritz values), grid points, width of the log10|λ| density in decades, and the relative
    threshold of a zero eigenvalue (None: 1e-8, or 1e-5 in float32)."""

    width: float | None = None
    grid_points: int = 2000
    log_width: float = 0.1
    zero_tol: float | None = None

    def check(self) -> None:
        for ok, message in [(self.width is None or self.width > 0, f"--width must be positive, got {self.width}"),
                            (self.grid_points >= 10, f"--grid-points must be at least 10, got {self.grid_points}"),
                            (self.log_width > 0, f"--log-width must be positive, got {self.log_width}"),
                            (self.zero_tol is None or 0 < self.zero_tol < 1,
                             f"--zero-tol must be in (0, 1), got {self.zero_tol}")]:
            if not ok:
                raise HessmpiError(message)


@dataclass
class Density:
    """A spectral density: its datasets (the /density and /trace contract, the tridiagonals,
    θ and its layout), root attributes, and a summary in lines of text."""

    datasets: dict
    attrs: dict = field(default_factory=dict)
    lines: list = field(default_factory=list)
    comm: object = field(default=None, repr=False)  # the ranks of the run: rank 0 writes
    checkpoint: str | None = None  # the run's checkpoint, removed once the result is saved

    @property
    def trace(self) -> tuple[float, float]:
        """(estimate, standard error) of the trace (Hutchinson over the SLQ probes)."""
        return float(self.datasets["trace/estimate"]), float(self.datasets["trace/stderr"])

    def __repr__(self):
        return "\n".join(["Density:", *self.lines])

    def save(self, path: str, **attrs) -> str:
        """Write the results file on rank 0, atomically; attrs join the root attributes. Then
        remove the run's checkpoint, if it had one."""
        from .checkpoint import discard

        results.save(path, self.datasets, {**self.attrs, **attrs}, self.comm)
        discard(self.checkpoint, self.comm)
        return path

    def plot(self, path: str | None = None, reference=None):
        """The density and its log-scale bulk (plots.density): a figure, also written to path
        if given; reference: exact eigenvalues to draw smoothed alike."""
        from ..plots import density as density_plots

        return density_plots.density(self.datasets, self.attrs, path, reference, comm=self.comm)


def summarize(q: slq.Quadrature, smoothing: Smoothing, dtype: str) -> tuple[dict, dict, list]:
    """The datasets and attributes that follow from the quadrature alone, and a report."""
    width = smoothing.width or slq.default_width(q)
    grid = slq.linear_grid(q, width, smoothing.grid_points)
    values = slq.smooth(q, grid, width)
    zero_tol = smoothing.zero_tol or (1e-8 if dtype == "float64" else 1e-5)
    eps = slq.zero_threshold(q, zero_tol)
    logd = slq.log_density(q, eps, smoothing.log_width)
    below = slq.mass_below(q, -eps)
    below_width = slq.mass_below(q, -width)
    moments = slq.moments(q, MOMENTS)
    est = trace.from_quadrature(q)
    fro = est.frobenius
    lo, hi = slq.spectral_range(q)
    datasets = {
        **q.datasets(),
        "density/grid": grid, "density/values": values, "density/width": width,
        "density/log_grid": logd.grid, "density/log_positive": logd.positive,
        "density/log_negative": logd.negative, "density/zero_mass": logd.zero_mass,
        "density/zero_threshold": eps, "density/log_width": smoothing.log_width,
        "density/ritz_range": np.array([lo, hi]),
        "density/moments": np.array([m.value for m in moments]),
        "density/moments_stderr": np.array([m.stderr for m in moments]),
        "density/negative_mass": below.estimate.value,
        "density/negative_mass_stderr": below.estimate.stderr,
        "density/negative_mass_bounds": np.array([below.lower, below.upper]),
        "density/mass_below_minus_width": below_width.estimate.value,
        "density/mass_below_minus_width_stderr": below_width.estimate.stderr,
        "density/mass_below_minus_width_bounds": np.array([below_width.lower, below_width.upper]),
        "trace/estimate": est.trace.value, "trace/stderr": est.trace.stderr,
        "trace/samples": q.n * q.alphas[:, 0],
        "trace/frobenius": fro.value, "trace/frobenius_stderr": fro.stderr,
    }
    attrs = {"width": width, "log_width": smoothing.log_width, "zero_tol": zero_tol,
             "probes": q.n_probes, "lanczos_steps": int(q.alphas.shape[1]), "probe_dist": q.distribution}
    n = q.n
    lines = [
        f"Ritz values in [{lo:.6g}, {hi:.6g}]; smoothing width σ = {width:.4g}",
        f"trace (Hutchinson, {q.n_probes} probes) = {est.trace.value:.6g} ± {est.trace.stderr:.2g}",
        f"Frobenius norm = {fro.value:.6g} ± {fro.stderr:.2g}",
        f"mass below −ε (ε = {eps:.3g}) = {below.estimate.value:.4f} ± {below.estimate.stderr:.2g} "
        f"(quadrature bracket [{below.lower:.4f}, {below.upper:.4f}], about {below.estimate.value * n:.0f} "
        f"of {n:,} eigenvalues); mass within ±ε = {logd.zero_mass:.4f}",
        f"mass below −σ = {below_width.estimate.value:.4f} ± {below_width.estimate.stderr:.2g} "
        f"(quadrature bracket [{below_width.lower:.4f}, {below_width.upper:.4f}])",
        "moments (1/n) tr(Hᵏ): " + ", ".join(f"k={k}: {m.value:.4g} ± {m.stderr:.2g}"
                                              for k, m in enumerate(moments, 1)),
    ]
    return datasets, attrs, lines


def check_settings(probes: int, steps: int, hutchpp: int, distribution: str) -> None:
    """HessmpiError naming the first bad setting of a density run."""
    for ok, message in [(probes >= 1, f"--probes must be at least 1, got {probes}"),
                        (steps >= 1, f"--lanczos-steps must be at least 1, got {steps}"),
                        (hutchpp == 0 or hutchpp >= 3, f"--hutchpp must be 0 or at least 3, got {hutchpp}"),
                        (distribution in PROBE_DISTRIBUTIONS,
                         f"unknown probe distribution {distribution!r}: choose one of "
                         f"{', '.join(PROBE_DISTRIBUTIONS)}")]:
        if not ok:
            raise HessmpiError(message)


def spectral_density(op, probes: int = 10, steps: int = 80, distribution: str = "rademacher", hutchpp: int = 30,
            seed: int = 0, smoothing: Smoothing | None = None, log=None, checkpoint: str | None = None) -> Density:
    """The spectral density of the symmetric operator op by SLQ (probes × steps products), and
    its trace by Hutch++ (hutchpp products; 0: none). Collective; the same numbers at every
    rank count. log(str) receives progress lines (default: printed by rank 0).

    checkpoint: a file (of a problem's curvature) that keeps the finished probes, and the
    products of the probe or Hutch++ under way when a stop request (`hessmpi.stop`) ends
    the run; a run with the same settings continues from it, retracing those products,
    and gives the numbers of an uninterrupted one. It is removed once the result is saved."""
    import time

    from .. import runtime
    from ..curvature.petsc import replay, retraceable, shell_matrix
    from . import checkpoint as checkpoints
    from .spectrum import model_datasets, operator_attrs

    log = runtime.say if log is None else log
    smoothing = smoothing or Smoothing()
    check_settings(probes, steps, hutchpp, distribution)
    smoothing.check()
    t0 = time.perf_counter()
    before = op.n_matvecs, op.compute_seconds, op.comm_seconds  # this call's cost is what follows
    problem = getattr(op, "problem", None)
    dtype = problem.model.dtype if problem is not None else "float64"
    steps = min(steps, op.n)
    base = operator_attrs(op)
    identity = checkpoints.identity(base, op.n, checkpoint, probes=probes, lanczos_steps=steps,
                                    probe_dist=distribution, hutchpp_products=hutchpp, seed=seed)
    theta = problem.theta if problem is not None else np.zeros(0)
    comm = op.comm
    mat = shell_matrix(op)
    try:
        done, earlier = None, 0
        saved = checkpoints.read(checkpoint, identity, theta, "density/alphas", comm) if checkpoint else None
        if saved is not None:
            done = slq.Quadrature.from_datasets(saved[0], op.n, distribution)
            done.n_matvecs = earlier = int(saved[1]["n_matvecs"])
            products = checkpoints.products_of_rank(saved[0], comm, op.lo, op.hi, log)
            replay(mat, products)
            log(f"checkpoint {checkpoint}: {done.n_probes} probe(s) done before"
                + (f", and {len(products)} products of the next step, which it retraces" if products else ""))

        def save(q, products, spent):
            """Write the probes of q and the products of the step under way to the checkpoint."""
            extra = checkpoints.products_datasets(products, comm, op.n)
            if comm.Get_rank() == 0:
                results.write(checkpoint, {**q.datasets(), "model/params": theta, **extra},
                              {**base, **identity, "n_matvecs": spent})
            log(f"  checkpoint: {q.n_probes} probe(s)" + (f" and {len(products)} products" if products else "")
                + f" saved to {checkpoint}")

        log(f"stochastic Lanczos quadrature: {probes} {distribution} probes × {steps} steps "
            f"(options prefix -density_bv_)")
        count = lambda: op.n_matvecs - before[0] + earlier  # noqa: E731 (this run's products, earlier ones too)
        q = slq.slq(mat, probes, steps, seed, distribution, matvec_counter=count,
                    log=lambda line: log("  " + line), done=done,
                    on_probe=checkpoint and (lambda q, products: save(q, products, count())))
        datasets, attrs, lines = summarize(q, smoothing, dtype)
        pp = None
        if hutchpp:
            start = op.n_matvecs
            with retraceable(mat, checkpoint and (lambda products: save(q, products, count()))):
                pp = trace.hutchpp(mat, hutchpp, seed, distribution)
            datasets.update({"trace/hutchpp/estimate": pp.trace.value, "trace/hutchpp/stderr": pp.trace.stderr,
                             "trace/hutchpp/sketch_rank": pp.sketch_rank})
            lines.insert(2, f"trace (Hutch++, {op.n_matvecs - start} products, sketch rank {pp.sketch_rank}) = "
                            f"{pp.trace.value:.6g} ± {pp.trace.stderr:.2g}")
    except Interrupted as e:
        raise stop.saved(e, checkpoint) from None
    finally:
        mat.destroy()  # on every rank: left to garbage collection, PETSc's exit could hang
    datasets.update(model_datasets(problem))
    attrs = {**base, **attrs, "n_matvecs": count(), "slq_matvecs": q.n_matvecs,
             "hutchpp_matvecs": pp.n_matvecs if pp else 0, "iterations": int(q.steps.sum()),
             "converged": q.n_probes, "operator_size": op.n, "compute_seconds": op.compute_seconds - before[1],
             "comm_seconds": op.comm_seconds - before[2], "wall_time": time.perf_counter() - t0,
             "resumed_after_probe": done.n_probes if done is not None else 0}
    return Density(datasets, attrs, lines, comm, checkpoint)


def resmooth(path: str, smoothing: Smoothing) -> Density:
    """The density of a density results file redrawn from its tridiagonals (no products), on
    this process; its other datasets are carried over."""
    smoothing.check()
    source, source_attrs = results.read(path, "density")
    if "density/alphas" not in source:
        raise HessmpiError(f"--from {path} holds no Lanczos tridiagonals to re-smooth")
    q = slq.Quadrature.from_datasets(source, int(source_attrs["operator_size"]), source_attrs["probe_dist"])
    datasets, attrs, lines = summarize(q, smoothing, source_attrs["dtype"])
    for name, value in source.items():
        if name.startswith(("trace/hutchpp/", "model/")):
            datasets[name] = value
    attrs = {**source_attrs, **attrs, "resmoothed_from": os.path.abspath(path), "command": results.command()}
    return Density(datasets, attrs, lines)
