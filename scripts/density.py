#!/usr/bin/env python3
"""Spectral density, trace and Frobenius norm of the Hessian (or GGN) by stochastic Lanczos quadrature.

    mpirun -n 8 python scripts/density.py --model cnn --n-samples 1000 --dtype float32 --probes 10
    python scripts/density.py --from results/density.h5 --width 0.01 --out results/density-wide.h5

Runs --lanczos-steps steps of Lanczos (float64, full reorthogonalization) from each
of --probes seeded random probes, and Hutch++ with --hutchpp products. Writes the
smoothed density (/density/grid, /density/values, width /density/width), its log-scale
view of the bulk near zero, the tridiagonals and probe seeds (so that --from can
re-smooth without a single new product), the spectral moments, the mass below zero,
/trace/estimate and /trace/stderr (Hutchinson over the same probes), Hutch++ and the
Frobenius norm with standard errors, to --out, and a PNG next to it.
"""

import os
import sys

import numpy as np

from hessmpi import cli, petsc_options

MOMENTS = 4


def parse(argv):
    parser = cli.common_parser(__doc__.splitlines()[0], "results/density.h5")
    parser.add_argument("--probes", type=int, default=10, help="random probe vectors (default 10)")
    parser.add_argument("--lanczos-steps", type=int, default=80, help="Lanczos steps per probe (default 80)")
    parser.add_argument("--probe-dist", default="rademacher", choices=("rademacher", "gaussian"))
    parser.add_argument("--hutchpp", type=int, default=30, metavar="K",
                        help="products for the Hutch++ trace estimate (0: skip it; default 30)")
    parser.add_argument("--width", type=float, default=None,
                        help="Gaussian smoothing width σ in eigenvalue units (default: 1/200 of the span "
                             "of the Ritz values)")
    parser.add_argument("--grid-points", type=int, default=2000,
                        help="points of the density grid (raised to 5 per σ if needed)")
    parser.add_argument("--log-width", type=float, default=0.1,
                        help="smoothing width of the log10|λ| density, in decades (default 0.1)")
    parser.add_argument("--zero-tol", type=float, default=None,
                        help="|λ| ≤ zero-tol · max|Ritz value| counts as zero "
                             "(default 1e-8 in float64, 1e-5 in float32)")
    parser.add_argument("--from", dest="source", default=None, metavar="FILE",
                        help="re-smooth the tridiagonals stored in a density results FILE (no products)")
    args = parser.parse_args(argv)
    checks = [(args.probes >= 1, f"--probes must be at least 1, got {args.probes}"),
              (args.lanczos_steps >= 1, f"--lanczos-steps must be at least 1, got {args.lanczos_steps}"),
              (args.hutchpp == 0 or args.hutchpp >= 3, f"--hutchpp must be 0 or at least 3, got {args.hutchpp}"),
              (args.width is None or args.width > 0, f"--width must be positive, got {args.width}"),
              (args.grid_points >= 10, f"--grid-points must be at least 10, got {args.grid_points}"),
              (args.log_width > 0, f"--log-width must be positive, got {args.log_width}"),
              (args.zero_tol is None or 0 < args.zero_tol < 1, f"--zero-tol must be in (0, 1), got {args.zero_tol}")]
    for ok, message in checks:
        if not ok:
            raise cli.HessmpiError(message)
    return args


def summarize(q, args, dtype):
    """The datasets and attributes that follow from the quadrature alone, and a report."""
    from hessmpi import density, trace

    width = args.width or density.default_width(q)
    grid = density.linear_grid(q, width, args.grid_points)
    values = density.smooth(q, grid, width)
    zero_tol = args.zero_tol or (1e-8 if dtype == "float64" else 1e-5)
    eps = density.zero_threshold(q, zero_tol)
    logd = density.log_density(q, eps, args.log_width)
    below = density.mass_below(q, -eps)
    below_width = density.mass_below(q, -width)
    moments = density.moments(q, MOMENTS)
    est = trace.from_quadrature(q)
    fro = est.frobenius
    lo, hi = density.spectral_range(q)
    datasets = {
        **q.datasets(),
        "density/grid": grid, "density/values": values, "density/width": width,
        "density/log_grid": logd.grid, "density/log_positive": logd.positive,
        "density/log_negative": logd.negative, "density/zero_mass": logd.zero_mass,
        "density/zero_threshold": eps, "density/log_width": args.log_width,
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
    attrs = {"width": width, "log_width": args.log_width, "zero_tol": zero_tol,
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


def resmooth(args, comm):
    """--from: recompute the density from a file's tridiagonals on rank 0; no products."""
    from hessmpi import density, density_plots, results

    if comm.Get_rank() != 0:
        return
    source, source_attrs = results.read(args.source, "density")
    if "density/alphas" not in source:
        raise cli.HessmpiError(f"--from {args.source} holds no Lanczos tridiagonals to re-smooth")
    q = density.Quadrature.from_datasets(source, int(source_attrs["operator_size"]), source_attrs["probe_dist"])
    command = cli.RunRecord(args, comm, 0, 0).attrs["command"]  # this run's command line
    datasets, attrs, lines = summarize(q, args, source_attrs["dtype"])
    for name in ("trace/hutchpp/estimate", "trace/hutchpp/stderr", "trace/hutchpp/sketch_rank", "model/params"):
        if name in source:
            datasets[name] = source[name]
    for line in lines:
        cli.say(line)
    attrs = {**source_attrs, **attrs, "resmoothed_from": os.path.abspath(args.source),
             "command": command}
    cli.write_results(args, datasets, attrs, density_plots.density)


def main():
    ours, petsc_args = cli.split_argv(sys.argv[1:])
    comm = cli.world()
    with cli.all_ranks(comm):
        args = parse(ours)
        cli.init_petsc(petsc_args)
        petsc_options.check_petsc_options(bv=("density_", "trace_"))  # a misspelt option fails now
        if args.source:  # without --from, problem_from_args checks --out
            from hessmpi import results

            if comm.Get_rank() == 0:
                results.check_output(args.out, args.overwrite)
            if os.path.abspath(args.source) == os.path.abspath(args.out):
                raise cli.HessmpiError("--from and --out name the same file; choose another --out")
        else:
            problem, theta = cli.problem_from_args(args, comm)
    if args.source:
        with cli.all_ranks(comm):
            resmooth(args, comm)
        return
    from hessmpi import density, density_plots, trace
    from hessmpi.petsc import shell_matrix

    record = cli.RunRecord(args, comm, problem.n_params, problem.n_samples)
    cli.say(cli.describe_run(args, problem, comm))
    op = problem.operator
    what = f"{problem.operator_kind}" + (f", layer {problem.layer} ({op.n:,} parameters)" if problem.layer else "")
    op.on_matvec = cli.progress_printer()
    mat = shell_matrix(op)
    steps = min(args.lanczos_steps, op.n)
    cli.say(f"stochastic Lanczos quadrature of the {what}: {args.probes} {args.probe_dist} probes × "
            f"{steps} steps (options prefix -density_bv_)")
    q = density.slq(mat, args.probes, steps, args.seed, args.probe_dist,
                    matvec_counter=lambda: op.n_matvecs, log=lambda line: cli.say("  " + line))
    datasets, attrs, lines = summarize(q, args, args.dtype)
    pp = None
    if args.hutchpp:
        start = op.n_matvecs
        pp = trace.hutchpp(mat, args.hutchpp, args.seed, args.probe_dist)
        datasets.update({"trace/hutchpp/estimate": pp.trace.value, "trace/hutchpp/stderr": pp.trace.stderr,
                         "trace/hutchpp/sketch_rank": pp.sketch_rank})
        lines.insert(2, f"trace (Hutch++, {op.n_matvecs - start} products, sketch rank {pp.sketch_rank}) = "
                        f"{pp.trace.value:.6g} ± {pp.trace.stderr:.2g}")
    for line in lines:
        cli.say(line)
    datasets["model/params"] = theta
    attrs = record.finish(**attrs, n_matvecs=op.n_matvecs, slq_matvecs=q.n_matvecs,
                          hutchpp_matvecs=pp.n_matvecs if pp else 0, iterations=int(q.steps.sum()),
                          converged=q.n_probes, operator_size=op.n, compute_seconds=op.compute_seconds,
                          comm_seconds=op.comm_seconds)
    cli.say(f"{op.n_matvecs} {problem.operator_kind} products in {attrs['wall_time']:.1f} s "
            f"({op.comm_seconds / max(op.compute_seconds + op.comm_seconds, 1e-12):.1%} in communication)")
    mat.destroy()  # here, on every rank: left to garbage collection, PETSc's exit could hang
    if comm.Get_rank() == 0:
        cli.write_results(args, datasets, attrs, density_plots.density)


if __name__ == "__main__":
    cli.main_guard(main)
