#!/usr/bin/env python3
"""Eigenpairs of the Hessian of the mean training loss: SLEPc on the distributed operator.

    mpirun -n 8 python scripts/spectrum.py --model cnn --nev 10 -hess_eps_monitor
    mpirun -n 8 python scripts/spectrum.py --model my_model.keras --data my_data.npz

Writes /spectrum/eigenvalues, /spectrum/eigenvectors (nev × n_params in θ order; nev ×
the block's size with --layer), /spectrum/residuals (true ‖Hx−λx‖), error bars
(/spectrum/stderr, /spectrum/ci_low, /spectrum/ci_high: the spread of each Rayleigh
quotient over --error-groups groups of the samples), θ and its layout to --out, and a
PNG next to it. With --checkpoint FILE the solve saves its progress after every pass (and,
on SIGTERM or SIGUSR1, the products of the pass under way) and continues from FILE when
started again with the same flags (hessmpi.eigenpairs).
"""

import sys
import time

from hessmpi import cli
from hessmpi.solvers.spectrum import ERROR_GROUPS, count_groups, eigenpairs


def main():
    started = time.perf_counter()
    ours, petsc_args = cli.split_argv(sys.argv[1:])
    comm = cli.world()
    with cli.all_ranks(comm):
        parser = cli.common_parser(__doc__.splitlines()[0], "results/spectrum.h5")
        parser.add_argument("--nev", type=int, default=10, help="number of eigenpairs")
        parser.add_argument("--which", default="largest", choices=("largest", "smallest", "magnitude"))
        parser.add_argument("--tol", type=float, default=None,
                            help="residual tolerance ‖Hx−λx‖ ≤ tol·‖H‖₂ (default 1e-8 in float64, 1e-5 in float32)")
        parser.add_argument("--max-passes", type=int, default=20,
                            help="deflated passes that look for missing copies of repeated eigenvalues "
                                 "(1 skips the check)")
        parser.add_argument("--checkpoint", default=None, metavar="FILE",
                            help="save progress after every pass, and on SIGTERM or SIGUSR1, to FILE and resume "
                                 "from it if it exists (a job stopped by its time limit continues when run again)")
        parser.add_argument("--error-groups", type=int, default=None, metavar="G",
                            help="error bars of the eigenvalues from G contiguous groups of the samples "
                                 f"(default {ERROR_GROUPS}, or --n-samples if fewer; 0: none)")
        args = parser.parse_args(ours)
        cli.init_petsc(petsc_args)
        cli.check_petsc_options(eps=("hess_", "hess_norm_"))  # a misspelt option fails now
        if args.max_passes < 1:
            raise cli.HessmpiError(f"--max-passes must be at least 1, got {args.max_passes}")
        problem, op, _ = cli.problem_from_args(args, comm, check=lambda n: count_groups(args.error_groups, n))
    cli.say(cli.describe_run(args, problem, comm))
    op.on_matvec = cli.progress_printer()
    cli.say(f"solving for the {args.nev} {args.which} eigenpairs (options prefix -hess_)")
    top = eigenpairs(op, args.nev, args.which, tol=args.tol, max_passes=args.max_passes, seed=args.seed,
                     error_groups=args.error_groups, checkpoint=args.checkpoint)
    cli.finish_run(args, op, top, started)


if __name__ == "__main__":
    cli.main_guard(main)
