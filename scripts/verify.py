#!/usr/bin/env python3
"""Check the derivatives before trusting a solve: finite differences of the gradient
and the HVP, symmetry of the operator, and determinism of repeated products.

    mpirun -n 2 python scripts/verify.py --model cnn --n-samples 500

Exits 0 if every check passes, 1 otherwise. Writes nothing.
"""

import sys

from hessmpi import cli


def main():
    ours, petsc_args = cli.split_argv(sys.argv[1:])
    comm = cli.world()
    with cli.all_ranks(comm):
        parser = cli.common_parser(__doc__.splitlines()[0], "unused")
        parser.add_argument("--perturb", type=float, default=1e-2,
                            help="check at θ + perturb·scale·N(0,I), off the kinks of ReLU/max-pool (0: at θ)")
        args = parser.parse_args(ours)
        if args.n_samples is None:
            args.n_samples = 500
        problem, theta = cli.problem_from_args(args, comm)
    from hessmpi import verify

    cli.say(cli.describe_run(args, problem, comm))
    checks = verify.run_all(problem, theta, args.seed, args.perturb)
    for c in checks:
        cli.say(f"{'ok  ' if c.passed else 'FAIL'} {c.name}: {c.error:.2e} (tolerance {c.tolerance:.0e}) {c.detail}")
    if not all(c.passed for c in checks):
        raise SystemExit(1)


if __name__ == "__main__":
    cli.main_guard(main)
