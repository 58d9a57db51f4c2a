#!/usr/bin/env python3
"""Draw the figures of a hessmpi results file.

    python scripts/plot.py results/rank_curve.h5            # results/rank_curve*.png
    python scripts/plot.py results/spectrum.h5 --prefix /tmp/spec

The kind of file is recognised by the contract datasets it holds (hessmpi.results.
CONTRACT); PLOTTERS maps each kind to a function (datasets, attrs, prefix) that
writes prefix*.png and returns the paths. To support a new kind, add its entry.
"""

import argparse
import os
import sys


def _spectrum(datasets, attrs, prefix):
    from hessmpi import plots

    plots.spectrum(datasets, attrs, prefix + ".png")
    return [prefix + ".png"]


def _rank_curve(datasets, attrs, prefix):
    from hessmpi import rank_plots

    return rank_plots.write_all(datasets, attrs, prefix)


PLOTTERS = {
    "rank_curve": _rank_curve,
    "spectrum": _spectrum,
}


def kind_of(datasets, path):
    """The first results kind whose contract datasets are all in the file."""
    from hessmpi.errors import ResultsError
    from hessmpi.results import CONTRACT

    for kind, names in CONTRACT.items():
        if all(name in datasets for name in names):
            return kind
    raise ResultsError(f"{path} holds none of the known result sets ({', '.join(CONTRACT)}); "
                       f"is it a hessmpi results file?")


def main(argv=None):
    from hessmpi import results
    from hessmpi.errors import HessmpiError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="a hessmpi results file (.h5)")
    parser.add_argument("--prefix", default=None,
                        help="write PREFIX.png, PREFIX_*.png (default: the file's path without .h5)")
    args = parser.parse_args(argv)
    try:
        datasets, attrs = results.read(args.file)
        kind = kind_of(datasets, args.file)
        if kind not in PLOTTERS:
            raise HessmpiError(f"{args.file} is a {kind} results file; scripts/plot.py draws "
                               f"{', '.join(PLOTTERS)} files so far")
        results.read(args.file, kind)  # names every missing contract dataset or attribute
        prefix = args.prefix or os.path.splitext(args.file)[0]
        folder = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(folder):
            raise HessmpiError(f"--prefix {prefix}: the folder {folder} does not exist")
        written = PLOTTERS[kind](datasets, attrs, prefix)
    except HessmpiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
