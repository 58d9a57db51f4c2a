#!/usr/bin/env python3
"""Draw the figures of a hessmpi results file.

    python scripts/plot.py results/rank_curve.h5            # results/rank_curve*.png
    python scripts/plot.py results/spectrum.h5 --prefix /tmp/spec

The kind of file (spectrum, rank curve, density, training run) is recognised by the
contract datasets it holds (hessmpi.plots.draw_file). Exits 2 with one message for a
file it cannot draw.
"""

import argparse
import sys


def main(argv=None):
    from hessmpi import plots
    from hessmpi.errors import HessmpiError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="a hessmpi results file (.h5)")
    parser.add_argument("--prefix", default=None,
                        help="write PREFIX.png, PREFIX_*.png (default: the file's path without .h5)")
    args = parser.parse_args(argv)
    try:
        written = plots.draw_file(args.file, args.prefix)
    except HessmpiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
