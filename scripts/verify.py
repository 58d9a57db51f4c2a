#!/usr/bin/env python3
"""Check the derivatives before trusting a solve: finite differences of the gradient
and the HVP, symmetry of the operator, and determinism of repeated products.

    mpirun -n 2 python scripts/verify.py --model cnn --n-samples 500

Each check prints one line: "ok" or "FAIL" with its error and tolerance, or "n/a" when it
is not checkable here, with the reason (e.g. every step of the finite differences would
cross a kink of ReLU/max-pooling, or lands where float32 rounding swamps them). Exits 1
if any check fails, 0 otherwise: a check that is not checkable does not fail the run.
Writes nothing.
"""

import sys

import numpy as np

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
        problem, op, _ = cli.problem_from_args(args, comm)
    from hessmpi.solvers.verify import verify

    cli.say(cli.describe_run(args, problem, comm))
    checks = verify(op, args.seed, args.perturb)
    for c in checks:
        if c.unchecked:
            error = f"error {c.error:.2e}, " if np.isfinite(c.error) else ""
            cli.say(f"n/a  {c.name}: not checkable: {c.unchecked} ({error}tolerance {c.tolerance:.0e}) {c.detail}")
        else:
            cli.say(f"{'ok  ' if c.passed else 'FAIL'} {c.name}: {c.error:.2e} (tolerance {c.tolerance:.0e}) "
                    f"{c.detail}")
    if any(c.failed for c in checks):
        raise SystemExit(1)


if __name__ == "__main__":
    cli.main_guard(main)
