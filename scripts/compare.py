#!/usr/bin/env python3
"""Compare training runs of scripts/newton.py: objective and test accuracy against data sweeps and wall time.

    python scripts/compare.py results/newton.h5 results/sgd.h5 results/adam.h5 --out results/compare.png

Writes one PNG (four panels) and prints a table with, per run, the final objective,
the final and best test accuracy and the data sweeps spent to reach them (and, with
--target, the sweeps and seconds at the first recorded iterate whose test accuracy
reaches the target).
No MPI needed.
"""

import argparse
import sys


def main(argv=None) -> int:
    from hessmpi import results
    from hessmpi.optim import fit
    from hessmpi.plots import training as training_plots
    from hessmpi.errors import HessmpiError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="results files of scripts/newton.py")
    parser.add_argument("--out", default="results/compare.png", help="the PNG to write")
    parser.add_argument("--target", type=float, default=None,
                        help="also report the sweeps at which each run first reaches this test accuracy")
    args = parser.parse_args(argv)
    try:
        runs = [(path, *results.read(path, "newton")) for path in args.files]
        results.check_output(args.out, overwrite=True)
    except HessmpiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in fit.comparison_table(runs, args.target):
        print(line)
    training_plots.compare(runs, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
