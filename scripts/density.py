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
Frobenius norm with standard errors, to --out, and a PNG next to it. With --checkpoint
FILE the run saves its progress after every probe (and, on SIGTERM or SIGUSR1, the
products of the probe under way) and continues from FILE when started again with the
same flags (hessmpi.spectral_density).
"""

import os
import sys
import time

from hessmpi import cli
from hessmpi.solvers import density


def main():
    started = time.perf_counter()
    ours, petsc_args = cli.split_argv(sys.argv[1:])
    comm = cli.world()
    with cli.all_ranks(comm):
        parser = cli.common_parser(__doc__.splitlines()[0], "results/density.h5")
        parser.add_argument("--probes", type=int, default=10, help="random probe vectors (default 10)")
        parser.add_argument("--lanczos-steps", type=int, default=80, help="Lanczos steps per probe (default 80)")
        parser.add_argument("--probe-dist", default="rademacher", choices=density.PROBE_DISTRIBUTIONS)
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
        parser.add_argument("--checkpoint", default=None, metavar="FILE",
                            help="save progress after every probe, and on SIGTERM or SIGUSR1, to FILE and resume "
                                 "from it if it exists (a job stopped by its time limit continues when run again)")
        parser.add_argument("--from", dest="source", default=None, metavar="FILE",
                            help="re-smooth the tridiagonals stored in a density results FILE (no products)")
        args = parser.parse_args(ours)
        smoothing = density.Smoothing(args.width, args.grid_points, args.log_width, args.zero_tol)
        density.check_settings(args.probes, args.lanczos_steps, args.hutchpp, args.probe_dist)
        smoothing.check()
        cli.init_petsc(petsc_args)
        cli.check_petsc_options(bv=("density_", "trace_"))  # a misspelt option fails now
        if args.source:  # without --from, problem_from_args checks --out
            from hessmpi import results

            if comm.Get_rank() == 0:
                results.check_output(args.out, args.overwrite)
            if os.path.abspath(args.source) == os.path.abspath(args.out):
                raise cli.HessmpiError("--from and --out name the same file; choose another --out")
            if comm.Get_rank() == 0:
                result = density.resmooth(args.source, smoothing)
        else:
            problem, op, _ = cli.problem_from_args(args, comm)
    if args.source:
        if comm.Get_rank() == 0:
            for line in result.lines:
                cli.say(line)
            cli.write_results(args, result)
        return
    cli.say(cli.describe_run(args, problem, comm))
    op.on_matvec = cli.progress_printer()
    result = density.spectral_density(op, args.probes, args.lanczos_steps, args.probe_dist, args.hutchpp,
                                      args.seed, smoothing, checkpoint=args.checkpoint)
    for line in result.lines:
        cli.say(line)
    cli.finish_run(args, op, result, started)


if __name__ == "__main__":
    cli.main_guard(main)
