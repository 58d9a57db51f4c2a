"""What every figure shares: making it, saving it, showing it inline, and the matrix's title.

Figures are matplotlib `Figure` objects made without pyplot, so no backend is forced and
no figure is kept by pyplot: a script saves them to PNG files, a notebook shows the one a
`.plot()` returns.
"""

from __future__ import annotations

from .. import results
from ..errors import ResultsError


def subplots(*args, figsize=None, **kwargs):
    """(figure, axes) as pyplot.subplots gives them, for a figure pyplot does not keep."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def save(fig, path: str) -> None:
    """Save a figure atomically (results.replace_file); if it cannot be written, ResultsError
    says why and a previous figure there is unchanged."""
    try:
        results.replace_file(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"),
                             suffix=".png")
    except OSError as e:
        raise ResultsError(f"cannot write the figure {path} ({results.reason(e)}); any previous figure there is "
                           f"unchanged, and it can be drawn again from the results file") from None


def finish(fig, path: str | None, comm=None):
    """Save fig to path (by rank 0 of comm, default MPI_COMM_WORLD) if path is given; return
    fig, which a notebook shows."""
    if path is not None:
        from .. import runtime

        if (comm.Get_rank() if comm is not None else runtime.rank()) == 0:
            save(fig, path)
    else:  # the caller shows it: in a notebook, loading pyplot's backend registers the inline formatter
        import matplotlib
        import matplotlib.pyplot as plt

        plt.switch_backend(matplotlib.get_backend())  # loads it now (matplotlib defers that to the first
        # pyplot figure); it closes no figure
    return fig


OPERATOR_NAMES = {"hessian": "Hessian", "ggn": "Gauss-Newton"}


def matrix_title(attrs: dict) -> str:
    """The matrix a results file describes, for a figure title: model, operator, the
    regularization if any, the layer block if not all of θ, e.g. "softmax Hessian +
    0.0001·R (laplacian)" or "cnn Gauss-Newton, block of conv1/kernel"."""
    matrix = OPERATOR_NAMES.get(attrs.get("operator", "hessian"), attrs.get("operator"))
    reg = attrs.get("regularization", "none")
    if reg not in ("none", None):
        matrix += f" + {float(attrs.get('gamma')):g}·R ({reg})"
    layer = attrs.get("layer") or "all"  # "all" in files of earlier versions, "" now
    where = "" if layer == "all" else f", block of {layer}"
    return f"{attrs.get('model')} {matrix}{where}"


