#!/usr/bin/env python3
"""Rank of the Hessian of the first n training samples, for each batch size n.

    mpirun -n 8 python scripts/rank_curve.py --model softmax
    mpirun -n 8 python scripts/rank_curve.py --model cnn --batch-sizes 1,2,5 --dtype float64
    mpirun -n 8 python scripts/rank_curve.py --regularization laplacian --gamma 1e-4

For each n: the numerical rank (eigenvalues with |λ| > tol·max|λ|), the leading
eigenvalues, the counts above several thresholds, the smallest eigenvalue, the HVPs
and seconds spent, and (from the images) dead pixels, rank(X) and the softmax caps
9·rank(X) and n_params − pixels. Routes: dense (softmax regression: exact, from
per-sample factors; tiny models: from unit vectors) and matrix-free (randomized range
finder + Rayleigh–Ritz on the distributed operator); see hessmpi/rank.py. Writes
/rank_curve/* to --out and PNGs next to it (scripts/plot.py redraws them).
"""

import os
import sys

import numpy as np

from hessmpi import cli, petsc_options


def build_parser():
    from hessmpi import rank

    parser = cli.common_parser(__doc__.splitlines()[0], "results/rank_curve.h5")
    parser.add_argument("--batch-sizes", default=None, metavar="N1,N2,...",
                        help="comma-separated batch sizes (default "
                             f"{','.join(map(str, rank.DEFAULT_BATCH_SIZES))}, those above the available "
                             "samples replaced by the available count)")
    parser.add_argument("--tol", type=float, default=None,
                        help="rank tolerance relative to max|λ| (default n·ε, n the matrix size: ε of float64 "
                             "for the dense route, of --dtype for the matrix-free route)")
    parser.add_argument("--method", default="auto", choices=("auto", "dense", "matrix-free", "both"),
                        help="auto: dense for softmax (exact), matrix-free otherwise")
    parser.add_argument("--regularization", default="none", choices=("none", "l2", "laplacian"),
                        help="analyse H + γR (R: identity, or the Laplacian penalty of the softmax weight images)")
    parser.add_argument("--gamma", type=float, default=1e-4, help="γ of H + γR (default 1e-4)")
    parser.add_argument("--max-rank", type=int, default=None,
                        help="largest range basis of the matrix-free route (default: what 4 GiB holds, at most "
                             "the matrix size); a batch whose rank exceeds it gets a lower bound and larger batches "
                             "are skipped")
    parser.add_argument("--n-vectors", type=int, default=4,
                        help="top eigenvectors stored for the largest batch (dense route)")
    return parser


def validate(args, problem):
    """Batch sizes, routes and tolerances of the run; raises HessmpiError on bad input."""
    from hessmpi import rank

    sizes = rank.parse_batch_sizes(args.batch_sizes, problem.n_samples)
    model = problem.model
    size = getattr(problem, "operator", problem.hessian).n
    closed_form = model.name == "softmax" and size == model.n_params
    methods = {"auto": ("dense",) if closed_form else ("matrix-free",),
               "both": ("dense", "matrix-free")}.get(args.method, (args.method,))
    if "dense" in methods and not closed_form and size > rank.DENSE_LIMIT:
        raise cli.HessmpiError(f"--method {args.method}: the dense route needs the {size:,}² matrix "
                               f"({size ** 2 * 8 / 2**30:.0f} GiB) and {size:,} HVPs per batch; for the "
                               f"{model.name} model use --method matrix-free (or --layer with at most "
                               f"{rank.DENSE_LIMIT:,} parameters)")
    if args.regularization == "laplacian" and model.name != "softmax":
        raise cli.HessmpiError("--regularization laplacian acts on the 28×28 weight images of the softmax model; "
                               "use --regularization l2 for the cnn")
    if args.regularization != "none" and size != model.n_params:
        raise cli.HessmpiError("--regularization acts on all the parameters: it cannot be combined with --layer")
    if args.regularization != "none" and not args.gamma > 0:
        raise cli.HessmpiError(f"--gamma must be positive, got {args.gamma}")
    if args.tol is not None and not 0 < args.tol < 1:
        raise cli.HessmpiError(f"--tol is relative to the largest |eigenvalue| and must be in (0, 1), got {args.tol}")
    max_rank = args.max_rank or min(size, 2**32 // (8 * size))
    if not 1 <= max_rank <= size:
        raise cli.HessmpiError(f"--max-rank must be between 1 and {size}, got {args.max_rank}")
    if args.n_vectors < 0:
        raise cli.HessmpiError(f"--n-vectors must be at least 0, got {args.n_vectors}")
    tols = {"dense": args.tol or rank.default_tol(size, "float64"),
            "matrix-free": args.tol or rank.default_tol(size, args.dtype)}
    return sizes, methods, tols, max_rank


def operator_options(args) -> dict:
    """Problem keywords for --operator/--layer where the common flags have them."""
    options = {}
    if getattr(args, "operator", "hessian") != "hessian":
        options["operator"] = args.operator
    if getattr(args, "layer", None):
        options["layer"] = args.layer
    return options


class Table:
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


def record_route(table, key, i, spectrum):
    from hessmpi import rank

    table.put(f"{key}/ranks", i, spectrum.rank)
    table.put(f"{key}/lower_bound", i, int(spectrum.lower_bound), fill=0, dtype=np.uint8)
    table.put(f"{key}/counts", i, spectrum.counts(), (len(rank.THRESHOLDS),))
    table.put_float(f"{key}/leading_eigenvalues", i, spectrum.leading(), (rank.N_LEADING,))
    table.put_float(f"{key}/eigenvalue_min", i, spectrum.minimum)
    table.put(f"{key}/n_negative", i, spectrum.n_negative)
    counted, uncounted = spectrum.gap
    table.put_float(f"{key}/smallest_counted", i, counted)
    table.put_float(f"{key}/largest_uncounted", i, uncounted)
    table.put(f"{key}/hvps", i, spectrum.n_hvps)
    table.put_float(f"{key}/seconds", i, spectrum.seconds)
    if spectrum.method == "dense":
        table.put_float(f"{key}/hvp_check", i, spectrum.hvp_check)
    else:
        table.put(f"{key}/subspace_dims", i, spectrum.subspace_dim)
        table.put(f"{key}/blocks", i, spectrum.blocks)
        table.put_float(f"{key}/band", i, spectrum.extra.get("band", np.nan))


def main():
    ours, petsc_args = cli.split_argv(sys.argv[1:])
    comm = cli.world()
    with cli.all_ranks(comm):
        args = build_parser().parse_args(ours)
        from hessmpi import rank

        rank.parse_batch_sizes(args.batch_sizes, None)  # a malformed list fails before the slow set-up
        cli.init_petsc(petsc_args)
        petsc_options.check_petsc_options(bv="rank_", eps="hess_norm_")  # a misspelt option fails now
        problem, theta = cli.problem_from_args(args, comm)
        sizes, methods, tols, max_rank = validate(args, problem)
    import time

    from hessmpi import data, rank, rank_plots, results
    from hessmpi.problem import Problem

    model, dataset = problem.model, problem.dataset
    size = getattr(problem, "operator", problem.hessian).n
    softmax = model.name == "softmax" and size == model.n_params
    pixels = model.image_size ** 2
    record = cli.RunRecord(args, comm, model.n_params, sizes[-1])
    cli.say(cli.describe_run(args, problem, comm))
    kind = "GGN" if getattr(args, "operator", "hessian") == "ggn" else "H"
    if getattr(args, "layer", None):
        kind += f" (block of layer {args.layer}, {size:,} parameters)"
    what = kind if args.regularization == "none" else f"{kind} + {args.gamma:g}·R ({args.regularization})"
    cli.say(f"rank of {what} for batch sizes {', '.join(map(str, sizes))}; route(s): {', '.join(methods)}; "
            + "; ".join(f"tol {m} {t:.3g}" for m, t in tols.items() if m in methods)
            + (f"; matrix-free basis at most {max_rank:,} columns" if "matrix-free" in methods else ""))
    table = Table(len(sizes))
    vectors = None
    skip_matrix_free_from = None
    total_hvps = total_blocks = determined = 0
    compute_seconds = comm_seconds = 0.0
    for i, n in enumerate(sizes):
        t0 = time.perf_counter()
        if comm.Get_rank() == 0:
            x, _ = data.select(dataset, n, 1, 0)
            bounds = rank.data_bounds(x)
            table.put("dead_pixels", i, bounds["dead_pixels"])
            table.put("rank_x", i, bounds["rank_x"])
            if softmax:
                table.put("cap_9_rank_x", i, (model.layout[0].shape[1] - 1) * bounds["rank_x"])
                table.put("cap_live_pixels", i, (model.layout[0].shape[1] - 1) * (pixels - bounds["dead_pixels"]))
                table.put("pixel_pattern", i, bounds["pattern"], (pixels, pixels), 0, np.uint8)
        run = tuple(m for m in methods if not (m == "matrix-free" and skip_matrix_free_from is not None))
        if not run:
            table.put("ranks", i, -1)
            cli.say(f"n={n:>5}: skipped (the matrix-free basis reached --max-rank {max_rank} at "
                    f"n = {skip_matrix_free_from})")
            continue
        batch_problem = Problem(model, dataset, n, comm, args.dtype, args.micro_batch, args.hvp_mode,
                                **operator_options(args))
        batch_problem.set_params(theta)
        op = getattr(batch_problem, "operator", batch_problem.hessian)
        op.on_matvec = cli.progress_printer()
        spectra = rank.analyse(rank.Batch.from_problem(batch_problem), run, tols, args.regularization, args.gamma,
                               max_rank, args.n_vectors if n == sizes[-1] else 0, args.seed, args.dtype,
                               log=lambda line: cli.say(f"  n={n}: {line}"))
        for key, spectrum in spectra.items():
            record_route(table, key.replace("-", "_"), i, spectrum)
        primary = spectra.get("dense") or spectra.get("matrix-free")
        table.put("ranks", i, primary.rank if primary else -1)
        table.put("rank_is_lower_bound", i, int(bool(primary and primary.lower_bound)), fill=0, dtype=np.uint8)
        if primary:
            table.put("counts", i, primary.counts(), (len(rank.THRESHOLDS),))
            table.put_float("leading_eigenvalues", i, primary.leading(), (rank.N_LEADING,))
            table.put_float("eigenvalue_min", i, primary.minimum)
            determined += not primary.lower_bound
            if primary.vectors is not None:
                vectors = (n, primary.values[:len(primary.vectors)], primary.vectors)
        mf = spectra.get("matrix-free")
        if mf is not None and mf.lower_bound:
            skip_matrix_free_from = n
        hvps = op.n_matvecs
        total_hvps += hvps
        compute_seconds += op.compute_seconds
        comm_seconds += op.comm_seconds
        total_blocks += mf.blocks if mf else 0
        table.put("hvps", i, hvps)
        table.put_float("seconds", i, time.perf_counter() - t0)
        line = f"n={n:>5}: rank {primary.rank if primary else '?'}"
        if primary and primary.lower_bound:
            line = f"n={n:>5}: rank ≥ {primary.rank} (the matrix-free basis reached --max-rank {max_rank})"
        if len(spectra) == 2:
            d, f = spectra["dense"].rank, spectra["matrix-free"].rank
            line += f" (dense {d}, matrix-free {f}{'' if d == f else ' — DISAGREE'})"
        if comm.Get_rank() == 0 and softmax:
            line += f"; 9·rank(X) = {table.data['cap_9_rank_x'][i]}, dead pixels {bounds['dead_pixels']}"
        if primary and not primary.lower_bound and primary.values.size:
            line += f"; λmax {primary.values[0]:.4g}, λmin {primary.minimum:.3g}"
        cli.say(line + f"; {hvps} HVPs, {time.perf_counter() - t0:.1f} s")
        if skip_matrix_free_from == n and n != sizes[-1]:
            cli.say(f"  the matrix-free route skips the larger batches (a rank ≥ {max_rank} there would cost "
                    f"as much to bound); raise --max-rank to go further")
    ranks_agree = None
    if len(methods) == 2:
        d, f = table.data["dense/ranks"], table.data["matrix_free/ranks"]
        both = (d >= 0) & (f >= 0) & (table.data["matrix_free/lower_bound"] == 0)
        ranks_agree = bool(np.all(d[both] == f[both]))
    attrs = record.finish(n_matvecs=total_hvps, iterations=total_blocks, converged=determined,
                          tol=tols[methods[0]], tol_dense=tols["dense"], tol_matrix_free=tols["matrix-free"],
                          tol_rule="given by --tol" if args.tol else
                          "matrix size * machine epsilon (float64 for the dense route, --dtype for matrix-free)",
                          method=",".join(methods), regularization=args.regularization,
                          matrix_size=size,
                          gamma=args.gamma if args.regularization != "none" else 0.0, max_rank=max_rank,
                          ranks_agree=-1 if ranks_agree is None else int(ranks_agree),
                          compute_seconds=compute_seconds, comm_seconds=comm_seconds)
    cli.say(f"{total_hvps} Hessian-vector products in {attrs['wall_time']:.1f} s")
    if comm.Get_rank() == 0:
        datasets = {f"rank_curve/{k}": v for k, v in table.data.items()}
        datasets["rank_curve/batch_sizes"] = np.array(sizes, dtype=np.int64)
        datasets["rank_curve/thresholds"] = np.array(rank.THRESHOLDS)
        if softmax:
            datasets["rank_curve/cap_shift_invariance"] = np.int64(model.n_params - pixels)
        if vectors is not None:
            datasets["rank_curve/top_eigenvectors_batch_size"] = np.int64(vectors[0])
            datasets["rank_curve/top_eigenvalues"] = vectors[1]
            datasets["rank_curve/top_eigenvectors"] = vectors[2]
        datasets["model/params"] = theta
        results.write(args.out, datasets, attrs)
        written = [args.out]
        if not args.no_plot:
            written += rank_plots.write_all(datasets, attrs, os.path.splitext(args.out)[0])
        cli.say("wrote " + ", ".join(written))


if __name__ == "__main__":
    cli.main_guard(main)
