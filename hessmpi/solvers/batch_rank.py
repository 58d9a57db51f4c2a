"""The numerical rank of a curvature against the batch size: `rank_curve`.

For each batch size n, the curvature (Hessian or GGN, all of θ or a layer's block; plus
γR if asked) of the mean loss over the first n samples is analysed by the routes of
`rank` (dense, exact for softmax regression; matrix-free otherwise): its rank, leading
eigenvalues, counts above thresholds, smallest eigenvalue, products and seconds, and,
for image data, what the images alone say (dead pixels, rank(X), the softmax caps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .. import results, stop
from ..errors import HessmpiError, Interrupted
from . import rank

METHODS = ("auto", "dense", "matrix-free", "both")


@dataclass
class Plan:
    """What a rank curve will do: batch sizes, routes, their tolerances, the matrix-free basis cap."""

    sizes: list
    methods: tuple
    tols: dict
    max_rank: int
    size: int  # the matrix's size
    closed_form: bool


def plan(op, batch_sizes=None, method: str = "auto", regularization: str = "none", gamma: float = 1e-4,
         tol: float | None = None, max_rank: int | None = None, n_vectors: int = 4) -> Plan:
    """Check the settings of a rank curve of the curvature op (a Problem's Hessian or GGN, or a
    layer's block); HessmpiError naming the setting on bad input."""
    problem = op.problem
    if problem is None:
        raise HessmpiError("a rank curve needs the curvature of a problem (hessmpi.Hessian or hessmpi.GGN)")
    sizes = (rank.parse_batch_sizes(batch_sizes, problem.n_samples) if batch_sizes is None or isinstance(batch_sizes, str)
             else sorted({int(n) for n in batch_sizes}))
    too_big = [n for n in sizes if not 1 <= n <= problem.n_samples]
    if too_big:
        raise HessmpiError(f"--batch-sizes: {', '.join(map(str, too_big))} outside 1..{problem.n_samples}")
    model, size = problem.model, op.n
    closed = rank.closed_form(problem) and size == model.n_params  # the GGN of a linear model is its Hessian
    if method not in METHODS:
        raise HessmpiError(f"unknown --method {method!r}: choose one of {', '.join(METHODS)}")
    methods = {"auto": ("dense",) if closed else ("matrix-free",),
               "both": ("dense", "matrix-free")}.get(method, (method,))
    if "dense" in methods and not closed and size > rank.DENSE_LIMIT:
        raise HessmpiError(f"--method {method}: the dense route needs the {size:,}² matrix "
                           f"({size ** 2 * 8 / 2**30:.0f} GiB) and {size:,} HVPs per batch; for the "
                           f"{model.name} model use --method matrix-free (or --layer with at most "
                           f"{rank.DENSE_LIMIT:,} parameters)")
    if regularization != "none":
        from ..curvature import regularizers

        regularizers.check(model, regularization)
        if size != model.n_params:
            raise HessmpiError("--regularization acts on all the parameters: it cannot be combined with --layer")
        if not gamma > 0:
            raise HessmpiError(f"--gamma must be positive, got {gamma}")
    if tol is not None and not 0 < tol < 1:
        raise HessmpiError(f"--tol is relative to the largest |eigenvalue| and must be in (0, 1), got {tol}")
    cap = max_rank or min(size, 2**32 // (8 * size))
    if not 1 <= cap <= size:
        raise HessmpiError(f"--max-rank must be between 1 and {size}, got {max_rank}")
    if n_vectors < 0:
        raise HessmpiError(f"--n-vectors must be at least 0, got {n_vectors}")
    tols = {"dense": tol or rank.default_tol(size, "float64"),
            "matrix-free": tol or rank.default_tol(size, model.dtype)}
    return Plan(sizes, methods, tols, cap, size, closed)


class _Table:
    """Per-batch arrays filled as the run goes; unfilled entries stay −1 / NaN."""

    def __init__(self, m):
        self.m = m
        self.data = {}

    def put(self, name, i, value, shape=(), fill=-1, dtype=np.int64):
        if name not in self.data:
            self.data[name] = np.full((self.m, *shape), fill, dtype=dtype)
        self.data[name][i] = value

    def put_float(self, name, i, value, shape=()):
        self.put(name, i, value, shape, np.nan, np.float64)

    def route(self, key, i, spectrum):
        self.put(f"{key}/ranks", i, spectrum.rank)
        self.put(f"{key}/lower_bound", i, int(spectrum.lower_bound), fill=0, dtype=np.uint8)
        self.put(f"{key}/counts", i, spectrum.counts(), (len(rank.THRESHOLDS),))
        self.put_float(f"{key}/leading_eigenvalues", i, spectrum.leading(), (rank.N_LEADING,))
        self.put_float(f"{key}/eigenvalue_min", i, spectrum.minimum)
        self.put(f"{key}/n_negative", i, spectrum.n_negative)
        counted, uncounted = spectrum.gap
        self.put_float(f"{key}/smallest_counted", i, counted)
        self.put_float(f"{key}/largest_uncounted", i, uncounted)
        self.put(f"{key}/hvps", i, spectrum.n_hvps)
        self.put_float(f"{key}/seconds", i, spectrum.seconds)
        if spectrum.method == "dense":
            self.put_float(f"{key}/hvp_check", i, spectrum.hvp_check)
        else:
            self.put(f"{key}/subspace_dims", i, spectrum.subspace_dim)
            self.put(f"{key}/blocks", i, spectrum.blocks)
            self.put_float(f"{key}/band", i, spectrum.extra.get("band", np.nan))


@dataclass
class RankCurve:
    """The rank curve's datasets (/rank_curve/*, θ and its layout) and root attributes."""

    datasets: dict
    attrs: dict = field(default_factory=dict)
    comm: object = field(default=None, repr=False)  # the ranks of the run: rank 0 writes
    checkpoint: str | None = None  # the run's checkpoint, removed once the result is saved

    @property
    def batch_sizes(self) -> np.ndarray:
        return self.datasets["rank_curve/batch_sizes"]

    @property
    def ranks(self) -> np.ndarray:
        return self.datasets["rank_curve/ranks"]

    def save(self, path: str, **attrs) -> str:
        """Write the results file on rank 0, atomically; attrs join the root attributes. Then
        remove the run's checkpoint, if it had one."""
        from .checkpoint import discard

        results.save(path, self.datasets, {**self.attrs, **attrs}, self.comm)
        discard(self.checkpoint, self.comm)
        return path

    def plot(self, prefix: str | None = None):
        """The figures of plots.rank (the curve; for softmax regression the sparsity, the top
        eigenvectors and the weights as images): written as prefix*.png if prefix is given,
        else returned (a notebook shows them)."""
        from ..plots import rank as rank_plots

        return rank_plots.write_all(self.datasets, self.attrs, prefix, self.comm)


def rank_curve(op, batch_sizes=None, method: str = "auto", regularization: str = "none", gamma: float = 1e-4,
               tol: float | None = None, max_rank: int | None = None, n_vectors: int = 4, seed: int = 0,
               log=None, checkpoint: str | None = None) -> RankCurve:
    """The rank of op's curvature over the first n samples for each n of batch_sizes (a list,
    or text '1,5,10'; default rank.DEFAULT_BATCH_SIZES up to the samples), by the routes of
    `method`; with regularization ('l2', 'laplacian') the rank of H + γR. Collective.
    A batch whose rank exceeds max_rank gets a lower bound and the matrix-free route skips
    the larger ones. log(str) receives progress lines (default: printed by rank 0).
    checkpoint: a file that keeps the finished batch sizes; a run with the same settings
    continues from it (a batch size a stop request, `hessmpi.stop`, interrupted is done
    again). It is removed once the result is saved."""
    from .. import runtime

    log = runtime.say if log is None else log
    p = plan(op, batch_sizes, method, regularization, gamma, tol, max_rank, n_vectors)
    try:
        return _rank_curve(op, p, regularization, gamma, tol, n_vectors, seed, log, checkpoint)
    except Interrupted as e:
        raise stop.saved(e, checkpoint) from None


def _rank_curve(op, p: Plan, regularization, gamma, tol, n_vectors, seed, log, checkpoint) -> RankCurve:
    from . import checkpoint as checkpoints
    from .spectrum import model_datasets, operator_attrs

    problem, kind, layer = op.problem, getattr(op, "kind", "hessian"), getattr(op, "layer", None)
    comm, model, samples = problem.comm, problem.model, problem.samples
    base = operator_attrs(op)
    identity = checkpoints.identity(base, op.n, checkpoint, batch_sizes=",".join(map(str, p.sizes)),
                                    method=",".join(p.methods), regularization=regularization, gamma=gamma,
                                    tol_dense=p.tols["dense"], tol_matrix_free=p.tols["matrix-free"],
                                    max_rank=p.max_rank, n_vectors=n_vectors, seed=seed)
    t_start = time.perf_counter()
    what = ("GGN" if kind == "ggn" else "H") + (f" (block of layer {layer}, {p.size:,} parameters)" if layer else "")
    what = what if regularization == "none" else f"{what} + {gamma:g}·R ({regularization})"
    log(f"rank of {what} for batch sizes {', '.join(map(str, p.sizes))}; route(s): {', '.join(p.methods)}; "
        + "; ".join(f"tol {m} {t:.3g}" for m, t in p.tols.items() if m in p.methods)
        + (f"; matrix-free basis at most {p.max_rank:,} columns" if "matrix-free" in p.methods else ""))
    table = _Table(len(p.sizes))
    pixels = model.layout[0].shape[0] if p.closed_form else None
    vectors, skip_from = None, None
    total_hvps = total_blocks = determined = 0
    compute_seconds = comm_seconds = 0.0
    done = 0
    saved = checkpoints.read(checkpoint, identity, problem.theta, "checkpoint/batches_done", comm) if checkpoint else None
    if saved is not None:
        datasets, attrs = saved
        done = int(datasets["checkpoint/batches_done"])
        table.data = {k[len("rank_curve/"):]: v for k, v in datasets.items() if k.startswith("rank_curve/")}
        if "checkpoint/top_eigenvectors" in datasets:
            vectors = (int(datasets["checkpoint/top_eigenvectors_batch_size"]),
                       datasets["checkpoint/top_eigenvalues"], datasets["checkpoint/top_eigenvectors"])
        skip_from = int(attrs["skip_from"]) if attrs["skip_from"] >= 0 else None
        total_hvps, total_blocks, determined = (int(attrs[k]) for k in ("n_matvecs", "iterations", "converged"))
        compute_seconds, comm_seconds = attrs["compute_seconds"], attrs["comm_seconds"]
        log(f"checkpoint {checkpoint}: batch sizes {', '.join(map(str, p.sizes[:done]))} done before")

    def save(i):
        """Write the table of the first i batch sizes and the counters to the checkpoint (rank 0)."""
        if comm.Get_rank() != 0:
            return
        state = {f"rank_curve/{k}": v for k, v in table.data.items()}
        state.update({"checkpoint/batches_done": np.int64(i), "model/params": problem.theta})
        if vectors is not None:
            state.update({"checkpoint/top_eigenvectors_batch_size": np.int64(vectors[0]),
                          "checkpoint/top_eigenvalues": vectors[1], "checkpoint/top_eigenvectors": vectors[2]})
        results.write(checkpoint, state, {**base, **identity, "skip_from": -1 if skip_from is None else skip_from,
                                          "n_matvecs": total_hvps, "iterations": total_blocks, "converged": determined,
                                          "compute_seconds": compute_seconds, "comm_seconds": comm_seconds})

    for i, n in enumerate(p.sizes):
        if i < done:
            continue
        stop.check(comm, f"before batch size {n}")
        t0 = time.perf_counter()
        bounds = None
        if getattr(samples, "pixels", False):  # rank 0 computes, every rank gets the same table
            bounds = comm.bcast(rank.data_bounds(samples.features(0, n)) if comm.Get_rank() == 0 else None)
            table.put("dead_pixels", i, bounds["dead_pixels"])
            table.put("rank_x", i, bounds["rank_x"])
            if p.closed_form:
                classes = model.layout[0].shape[1]
                table.put("cap_9_rank_x", i, (classes - 1) * bounds["rank_x"])
                table.put("cap_live_pixels", i, (classes - 1) * (pixels - bounds["dead_pixels"]))
                table.put("pixel_pattern", i, bounds["pattern"], (pixels, pixels), 0, np.uint8)
        run = tuple(m for m in p.methods if not (m == "matrix-free" and skip_from is not None))
        if not run:
            table.put("ranks", i, -1)
            log(f"n={n:>5}: skipped (the matrix-free basis reached --max-rank {p.max_rank} at n = {skip_from})")
            continue
        sub = problem.subset(n)
        batch_op = sub.operator_for(kind, layer)
        batch_op.on_matvec = op.on_matvec
        spectra = rank.analyse(rank.Batch.from_problem(sub, batch_op), run, p.tols, regularization, gamma,
                               p.max_rank, n_vectors if n == p.sizes[-1] else 0, seed, model.dtype,
                               log=lambda line: log(f"  n={n}: {line}"))
        for key, spectrum in spectra.items():
            table.route(key.replace("-", "_"), i, spectrum)
        primary = spectra.get("dense") or spectra.get("matrix-free")
        table.put("ranks", i, primary.rank)
        table.put("rank_is_lower_bound", i, int(primary.lower_bound), fill=0, dtype=np.uint8)
        table.put("counts", i, primary.counts(), (len(rank.THRESHOLDS),))
        table.put_float("leading_eigenvalues", i, primary.leading(), (rank.N_LEADING,))
        table.put_float("eigenvalue_min", i, primary.minimum)
        determined += not primary.lower_bound
        if primary.vectors is not None:
            vectors = (n, primary.values[:len(primary.vectors)], primary.vectors)
        free = spectra.get("matrix-free")
        if free is not None and free.lower_bound:
            skip_from = n
        hvps = batch_op.n_matvecs
        total_hvps += hvps
        compute_seconds += batch_op.compute_seconds
        comm_seconds += batch_op.comm_seconds
        total_blocks += free.blocks if free else 0
        table.put("hvps", i, hvps)
        table.put_float("seconds", i, time.perf_counter() - t0)
        line = f"n={n:>5}: rank {primary.rank}"
        if primary.lower_bound:
            line = f"n={n:>5}: rank ≥ {primary.rank} (the matrix-free basis reached --max-rank {p.max_rank})"
        if len(spectra) == 2:
            d, f = spectra["dense"].rank, spectra["matrix-free"].rank
            line += f" (dense {d}, matrix-free {f}{'' if d == f else ' — DISAGREE'})"
        if bounds is not None and p.closed_form:
            line += f"; 9·rank(X) = {table.data['cap_9_rank_x'][i]}, dead pixels {bounds['dead_pixels']}"
        if not primary.lower_bound and primary.values.size:
            line += f"; λmax {primary.values[0]:.4g}, λmin {primary.minimum:.3g}"
        log(line + f"; {hvps} HVPs, {time.perf_counter() - t0:.1f} s")
        if skip_from == n and n != p.sizes[-1]:
            log(f"  the matrix-free route skips the larger batches (a rank ≥ {p.max_rank} there would cost "
                f"as much to bound); raise --max-rank to go further")
        if checkpoint:
            save(i + 1)
    ranks_agree = None
    if len(p.methods) == 2:
        d, f = table.data["dense/ranks"], table.data["matrix_free/ranks"]
        both = (d >= 0) & (f >= 0) & (table.data["matrix_free/lower_bound"] == 0)
        ranks_agree = bool(np.all(d[both] == f[both]))
    attrs = {**base, "n_samples": p.sizes[-1], "n_matvecs": total_hvps, "iterations": total_blocks,
             "converged": determined, "tol": p.tols[p.methods[0]], "tol_dense": p.tols["dense"],
             "tol_matrix_free": p.tols["matrix-free"],
             "tol_rule": "given by --tol" if tol else
             "matrix size * machine epsilon (float64 for the dense route, --dtype for matrix-free)",
             "method": ",".join(p.methods), "regularization": regularization, "matrix_size": p.size,
             "gamma": gamma if regularization != "none" else 0.0, "max_rank": p.max_rank,
             "ranks_agree": -1 if ranks_agree is None else int(ranks_agree), "closed_form": int(p.closed_form),
             "compute_seconds": compute_seconds, "comm_seconds": comm_seconds,
             "wall_time": time.perf_counter() - t_start}
    datasets = {f"rank_curve/{k}": v for k, v in table.data.items()}
    datasets["rank_curve/batch_sizes"] = np.array(p.sizes, dtype=np.int64)
    datasets["rank_curve/thresholds"] = np.array(rank.THRESHOLDS)
    if p.closed_form:
        datasets["rank_curve/cap_shift_invariance"] = np.int64(model.n_params - pixels)
    if vectors is not None:
        datasets["rank_curve/top_eigenvectors_batch_size"] = np.int64(vectors[0])
        datasets["rank_curve/top_eigenvalues"] = vectors[1]
        datasets["rank_curve/top_eigenvectors"] = vectors[2]
    datasets.update(model_datasets(problem))
    log(f"{total_hvps} Hessian-vector products in {attrs['wall_time']:.1f} s")
    attrs["resumed_after_batch"] = done
    return RankCurve(datasets, attrs, comm, checkpoint)
