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
import os
import sys

import numpy as np


def table(runs, target=None) -> list[str]:
    """One line per run: method, rows, sweeps, wall time, final F, final/best test accuracy."""
    width = max([4] + [len(os.path.basename(path)) for path, _, _ in runs])
    head = (f"{'file':<{width}} {'method':<8} {'iters':>6} {'sweeps':>9} {'time s':>8} {'final F':>12} "
            f"{'test':>7} {'best test':>9} {'@ sweeps':>9}")
    if target is not None:
        head += f" {'sweeps to ' + format(target, '.3f'):>16} {'time s':>8}"
    lines = [head]
    for path, d, attrs in runs:
        acc, sweeps = np.asarray(d["newton/test_accuracy"]), np.asarray(d["newton/sweeps"])
        wall = np.asarray(d["newton/wall_time"])
        best = int(np.nanargmax(acc)) if np.any(np.isfinite(acc)) else 0
        line = (f"{os.path.basename(path):<{width}} {attrs.get('method', '?'):<8} {int(d['newton/iteration'][-1]):>6} "
                f"{sweeps[-1]:>9.2f} {d['newton/wall_time'][-1]:>8.1f} {d['newton/loss'][-1]:>12.6g} "
                f"{acc[-1]:>7.4f} {acc[best]:>9.4f} {sweeps[best]:>9.2f}")
        if target is not None:
            reached = np.flatnonzero(acc >= target)
            line += (f" {sweeps[reached[0]]:>16.2f} {wall[reached[0]]:>8.1f}" if reached.size
                     else f" {'not reached':>16} {'':>8}")
        lines.append(line)
    return lines


def main(argv=None) -> int:
    from hessmpi import results, training_plots
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
    for line in table(runs, args.target):
        print(line)
    training_plots.compare(runs, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
