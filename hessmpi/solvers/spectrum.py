"""Eigenpairs of a curvature operator, with true residuals, error bars and a checkpoint: `eigenpairs`.

The solve is `eigen.solve` (SLEPc, every copy of repeated eigenvalues) on the operator's
PETSc shell matrix. Each eigenvalue of a problem's curvature gets an error bar from the
spread of its Rayleigh quotient over groups of the samples (`errorbars`); the group
products add up to the pair's product, which gives its true residual. With a
checkpoint file the pairs held after every pass, and the products of the pass under way
when a stop is requested (`hessmpi.stop`), are saved to it (atomically, by rank 0); a
solve started again with the same settings and file continues from there and gives the
eigenvalues of an uninterrupted solve; the file is removed once the solve is done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .. import results, stop
from ..errors import HessmpiError, Interrupted
from . import checkpoint as checkpoints
from . import eigen, errorbars

ERROR_GROUPS = 10
CHECKPOINT_COUNTERS = ("passes", "next_want", "iterations", "n_matvecs", "norm_estimate", "solver")


@dataclass
class Eigenpairs:
    """The eigenpairs of an operator, best first for `which`, with what they cost.

    vectors is k × n (full, on every rank; θ order, or the block's order for a layer);
    residuals are the true ‖Hx − λx‖. stderr, ci_low, ci_high (and the group quotients
    behind them) are the error bars, None without them. n_matvecs counts every product:
    the solve's passes and those that gave the true residuals (with error bars, their
    group products, one product per pair); wall_time is the whole call's.
    """

    values: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray
    which: str
    tol: float
    n_matvecs: int
    iterations: int
    passes: int
    wall_time: float
    solver: str
    attrs: dict = field(default_factory=dict)
    stderr: np.ndarray | None = None
    ci_low: np.ndarray | None = None
    ci_high: np.ndarray | None = None
    group_quotients: np.ndarray | None = None
    group_sizes: np.ndarray | None = None
    confidence: float = float("nan")
    extra: dict = field(default_factory=dict)  # datasets to store besides the contract (/model/*)
    comm: object = field(default=None, repr=False)  # the ranks of the solve: rank 0 writes
    checkpoint: str | None = None  # the solve's checkpoint, removed once the result is saved

    @property
    def k(self) -> int:
        return len(self.values)

    def relative_residuals(self) -> np.ndarray:
        return self.residuals / np.maximum(np.abs(self.values), 1e-300)

    def table(self) -> list[str]:
        """One line per pair: index, eigenvalue, residual, relative residual, error bar."""
        bars = self.stderr is not None
        lines = [f"{'i':>3}  {'eigenvalue':>22}  {'residual':>10}  {'rel. residual':>13}"
                 + (f"  λ ± standard error [{self.confidence:.0%} interval, {len(self.group_sizes)} groups]"
                    if bars else "")]
        for i, (lam, r, rel) in enumerate(zip(self.values, self.residuals, self.relative_residuals())):
            bar = f"  {lam:.6g} ± {self.stderr[i]:.2g} [{self.ci_low[i]:.6g}, {self.ci_high[i]:.6g}]" if bars else ""
            lines.append(f"{i:3d}  {lam:22.15g}  {r:10.3e}  {rel:13.3e}{bar}")
        return lines

    def __repr__(self):
        return "\n".join([f"Eigenpairs: {self.k} {self.which} of a {self.vectors.shape[1]:,} × "
                          f"{self.vectors.shape[1]:,} operator, {self.n_matvecs} products, {self.wall_time:.1f} s",
                          *self.table()])

    def datasets(self) -> dict:
        out = {"spectrum/eigenvalues": self.values, "spectrum/eigenvectors": self.vectors,
               "spectrum/residuals": self.residuals, **self.extra}
        if self.stderr is not None:
            out.update({"spectrum/stderr": self.stderr, "spectrum/ci_low": self.ci_low,
                        "spectrum/ci_high": self.ci_high, "spectrum/group_quotients": self.group_quotients,
                        "spectrum/group_sizes": self.group_sizes})
        return out

    def save(self, path: str, **attrs) -> str:
        """Write the results file (the /spectrum contract, θ and its layout) on rank 0, atomically;
        attrs are added to the file's root attributes; then remove the solve's checkpoint, if
        it had one. Returns path."""
        results.save(path, self.datasets(), {**self.attrs, **attrs}, self.comm)
        checkpoints.discard(self.checkpoint, self.comm)
        return path

    def plot(self, path: str | None = None):
        """The eigenvalues with their error bars and their relative residuals: a matplotlib
        figure (shown inline in a notebook), also written to path as a PNG if given."""
        from ..plots import spectrum

        return spectrum.spectrum(self.datasets(), self.attrs, path, comm=self.comm)


def default_tol(op) -> float:
    """1e-8, or 1e-5 for an operator computed in float32."""
    dtype = getattr(getattr(getattr(op, "problem", None), "model", None), "dtype", "float64")
    return 1e-5 if dtype == "float32" else 1e-8


def count_groups(given: int | None, n_samples: int) -> int:
    """The number of groups of the error bars: `given` if not None (0, or 2..n_samples, else
    HessmpiError), by default ERROR_GROUPS capped at n_samples (0 with one sample)."""
    if given is None:
        groups = min(ERROR_GROUPS, n_samples)
        return groups if groups >= 2 else 0
    if given != 0 and not 2 <= given <= n_samples:
        raise HessmpiError(f"--error-groups must be 0 (no error bars) or between 2 and the "
                           f"{n_samples} samples, got {given}")
    return given


def eigenpairs(op, k: int = 10, which: str = "largest", tol: float | None = None, max_passes: int = 20,
               seed: int = 0, error_groups: int | None = None, confidence: float = 0.95,
               checkpoint: str | None = None, prefix: str = "hess_", log=None, start=None,
               ncv: int | None = None) -> Eigenpairs:
    """The k best eigenpairs of the symmetric operator op for `which` ('largest', 'smallest',
    'magnitude'), every copy of a repeated eigenvalue included (eigen.solve). Collective.

    tol: residual tolerance (default 1e-8, 1e-5 in float32; relative to |λ| for 'largest',
    to ‖H‖₂ otherwise). max_passes=1 skips the check for missing copies. error_groups: the
    number of sample groups of the error bars (default 10 for a problem's curvature; 0:
    none); their group products add up to the pairs' products, which give the true
    residuals. checkpoint: a file to save progress to after every pass and resume from.
    PETSc options under `prefix` (-hess_eps_type lanczos, …) override the defaults.
    log(str) receives progress lines and, at the end, the table of the pairs (default:
    printed by rank 0). start: vectors (rows of an array, or an Eigenpairs) to start the first
    pass from, e.g. the eigenpairs of the same model a few training steps before. ncv: the
    first pass's basis size (default SLEPc's; -<prefix>eps_ncv overrides).
    """
    from .. import runtime
    from ..curvature.petsc import shell_matrix, vec_from_full, vec_to_full

    started = time.perf_counter()
    log = runtime.say if log is None else log
    problem = getattr(op, "problem", None)
    tol = default_tol(op) if tol is None else tol
    if max_passes < 1:
        raise HessmpiError(f"--max-passes must be at least 1, got {max_passes}")
    if errorbars.supports(op):
        groups = count_groups(error_groups, problem.n_samples)
    elif error_groups:
        raise HessmpiError("error bars need a curvature of the data (a Hessian or GGN, or a block of one)")
    else:
        groups = 0
    attrs = operator_attrs(op)
    identity = checkpoints.identity(attrs, op.n, checkpoint, seed=seed, which=which, nev=k, tol=tol)
    theta = problem.theta if problem is not None else np.zeros(0)
    comm = op.comm
    seconds = op.compute_seconds, op.comm_seconds
    mat = shell_matrix(op)
    resume, start_vecs = None, []
    try:
        if start is not None:
            rows = np.atleast_2d(np.asarray(getattr(start, "vectors", start), dtype=np.float64))
            if rows.shape[1] != op.n:
                raise HessmpiError(f"start vectors have {rows.shape[1]} entries, the operator {op.n} rows")
            start_vecs = [vec_from_full(mat, row) for row in rows]
        if checkpoint:
            saved = load_checkpoint(checkpoint, identity, theta, comm)
            if saved is not None:
                products = checkpoints.products_of_rank(saved.pop("datasets"), comm, op.lo, op.hi, log)
                resume = eigen.Progress(vectors=[vec_from_full(mat, x) for x in saved.pop("vectors")], **saved,
                                        replay=products)
                log(f"checkpoint {checkpoint}: {resume.passes} pass(es) done before"
                    + (f", and {len(products)} products of the next, which it retraces" if products else ""))

        def on_pass(progress):
            vectors = [vec_to_full(v, comm) for v in progress.vectors]
            products = checkpoints.products_datasets(progress.replay, comm, op.n)
            if comm.Get_rank() == 0:
                save_checkpoint(checkpoint, progress, vectors, products, {**attrs, **identity}, theta, op.n)
            log(f"  checkpoint: {progress.passes} pass(es)"
                + (f" and {len(progress.replay)} products of the next" if progress.replay else "")
                + f" saved to {checkpoint}")

        try:
            res = eigen.solve(mat, k, which, tol=tol, prefix=prefix, seed=seed, max_passes=max_passes,
                              matvec_counter=lambda: op.n_matvecs, log=lambda line: log("  " + line),
                              on_pass=on_pass if checkpoint else None, resume=resume, start=start_vecs,
                              ncv=ncv, true_residuals=not groups)
        except Interrupted as e:
            raise stop.saved(e, checkpoint) from None
        if res.converged == 0:  # the same on every rank
            raise HessmpiError(f"no eigenpair converged in {res.iterations} iterations; try "
                               f"-{prefix}eps_max_it, -{prefix}eps_ncv or a looser tolerance", collective=True)
        vectors = np.array([vec_to_full(v, comm) for v in res.vectors]).reshape(len(res.vectors), op.n)
        for v in res.vectors + (resume.vectors if resume else []) + start_vecs:  # destroying twice is harmless
            v.destroy()
    finally:
        mat.destroy()  # on every rank: left to garbage collection, PETSc's exit can hang
    if not (np.all(np.isfinite(res.values)) and np.all(np.isfinite(vectors))):
        raise HessmpiError("the eigen solve produced non-finite values: check the weights (NaN?) "
                           "and try float64", collective=True)
    if res.converged < k:
        log(f"warning: only {res.converged} of {k} eigenpairs converged; try -{prefix}eps_max_it or "
            f"-{prefix}eps_ncv")
    result = Eigenpairs(res.values, vectors, res.residuals, which, tol, res.n_matvecs, res.iterations, res.passes,
                        res.wall_time, res.solver, comm=comm, checkpoint=checkpoint)
    if groups:  # the group products give the true residuals too
        spread = errorbars.for_operator(op, vectors, n_groups=groups, confidence=confidence, products=True)
        result.residuals = np.array([np.linalg.norm(hv - lam * v) for lam, v, hv in
                                     zip(res.values, vectors, spread.products)])
        result.n_matvecs += len(vectors)
        result.stderr, result.ci_low, result.ci_high = spread.stderr, spread.low, spread.high
        result.group_quotients, result.group_sizes, result.confidence = spread.quotients, spread.sizes, confidence
    result.wall_time = time.perf_counter() - started
    result.attrs = {**attrs, "n_matvecs": result.n_matvecs, "iterations": res.iterations, "converged": res.converged,
                    "passes": res.passes, "eps_type": res.solver, "tol": tol, "which": which, "nev": k,
                    "wall_time": result.wall_time, "compute_seconds": op.compute_seconds - seconds[0],
                    "comm_seconds": op.comm_seconds - seconds[1], "resumed_after_pass": resume.passes if resume else 0,
                    "operator_size": op.n, "error_groups": groups,
                    "confidence": confidence if groups else float("nan"),
                    "errorbar_products": len(vectors) if groups else 0}
    result.extra = model_datasets(problem)
    for line in result.table():
        log(line)
    return result


def operator_attrs(op) -> dict:
    """The root attributes of a results file about op: those of its problem (model, data, …),
    the curvature (`operator`: hessian or ggn) and the block (`layer`, "" for all of θ)."""
    problem = getattr(op, "problem", None)
    attrs = problem.attrs() if problem is not None else {
        "model": "operator", "dataset": "", "n_params": op.n, "n_samples": 0, "n_ranks": op.comm.Get_size(),
        "dtype": "float64", "hessmpi_version": results.version(), "command": results.command()}
    attrs.update(operator=getattr(op, "kind", "operator"), layer=getattr(op, "layer", "") or "")
    return attrs


def model_datasets(problem) -> dict:
    """/model/params (θ) and /model/layout of a problem's model, for a results file."""
    if problem is None:
        return {}
    return {"model/params": problem.theta, **problem.model.layout.datasets()}


def save_checkpoint(path, progress, vectors, products, attrs, theta, n):
    """Write the solve's progress (its vectors as full arrays of the operator's size n, and the
    datasets of the products of an interrupted pass, checkpoint.products_datasets) and the
    run's identity to path, atomically."""
    datasets = {"checkpoint/values": progress.values, "checkpoint/residuals": progress.residuals,
                "checkpoint/vectors": np.array(vectors).reshape(len(vectors), n), "model/params": theta, **products}
    counters = {name: getattr(progress, name) for name in CHECKPOINT_COUNTERS}
    results.write(path, datasets, {**attrs, **counters, "pass_log": "\n".join(progress.pass_log)})


def load_checkpoint(path, identity, theta, comm):
    """The saved progress at path as keyword arguments of eigen.Progress (vectors as full arrays;
    `datasets`: the file's, for its products), or None if there is none. Collective."""
    loaded = checkpoints.read(path, identity, theta, "checkpoint/vectors", comm)
    if loaded is None:
        return None
    datasets, attrs = loaded
    saved = {name: attrs[name] for name in CHECKPOINT_COUNTERS}
    saved.update(values=datasets["checkpoint/values"], residuals=datasets["checkpoint/residuals"],
                 vectors=list(datasets["checkpoint/vectors"]), datasets=datasets,
                 pass_log=attrs["pass_log"].split("\n") if attrs["pass_log"] else [])
    return saved
