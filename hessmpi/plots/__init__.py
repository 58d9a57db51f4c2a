"""Figures of results: spectra, densities, rank curves, training runs (matplotlib, no backend forced)."""

from __future__ import annotations

import os

from ..errors import HessmpiError, ResultsError
from . import density, monitor, rank, spectrum, training
from .common import matrix_title


def _one(draw):
    def write(datasets, attrs, prefix):
        draw(datasets, attrs, prefix + ".png")
        return [prefix + ".png"]
    return write


# results kind (results.CONTRACT) → function (datasets, attrs, prefix) writing prefix*.png, returning the paths
PLOTTERS = {
    "spectrum": _one(spectrum.spectrum),
    "rank_curve": rank.write_all,
    "density": _one(density.density),
    "newton": _one(training.history),
    "monitor": _one(monitor.monitor),
}


def kind_of(datasets: dict, path: str) -> str:
    """The first results kind whose contract datasets are all in the file."""
    from ..results import CONTRACT

    for kind, names in CONTRACT.items():
        if all(name in datasets for name in names):
            return kind
    raise ResultsError(f"{path} holds none of the known result sets ({', '.join(CONTRACT)}); "
                       f"is it a hessmpi results file?")


def draw_file(path: str, prefix: str | None = None) -> list[str]:
    """Every figure of a results file, as prefix*.png (default: the file's path without its
    extension); returns the paths. HessmpiError naming what is wrong with the file."""
    from .. import results

    datasets, _ = results.read(path)
    kind = kind_of(datasets, path)
    datasets, attrs = results.read(path, kind)  # names every missing contract dataset or attribute
    prefix = prefix or os.path.splitext(path)[0]
    folder = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(folder):
        raise HessmpiError(f"--prefix {prefix}: the folder {folder} does not exist")
    return PLOTTERS[kind](datasets, attrs, prefix)


__all__ = ["PLOTTERS", "density", "draw_file", "kind_of", "matrix_title", "monitor", "rank", "spectrum", "training"]
