"""Figures written from results files (matplotlib, no display needed)."""

from __future__ import annotations

import os
import tempfile

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str) -> None:
    """Save a figure atomically (temporary file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp", suffix=".png", dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _pyplot().close(fig)


OPERATOR_NAMES = {"hessian": "Hessian", "ggn": "Gauss-Newton"}


def matrix_title(attrs: dict) -> str:
    """The matrix a results file describes, for a figure title: model, operator, the
    regularization if any, the layer block if not all of θ, e.g. "softmax Hessian +
    0.0001·R (laplacian)" or "cnn Gauss-Newton, block of conv1/kernel"."""
    matrix = OPERATOR_NAMES.get(attrs.get("operator", "hessian"), attrs.get("operator"))
    reg = attrs.get("regularization", "none")
    if reg not in ("none", None):
        matrix += f" + {float(attrs.get('gamma')):g}·R ({reg})"
    layer = attrs.get("layer") or "all"  # "all" in files written before RunRecord recorded ""
    where = "" if layer == "all" else f", block of {layer}"
    return f"{attrs.get('model')} {matrix}{where}"


def spectrum(datasets: dict, attrs: dict, path: str) -> None:
    """Eigenvalues against their index (with their confidence intervals if the datasets hold
    them), and their relative residuals, as a PNG; the title names the matrix (attrs
    "operator", "layer")."""
    plt = _pyplot()
    values = np.asarray(datasets["spectrum/eigenvalues"])
    residuals = np.asarray(datasets["spectrum/residuals"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    idx = np.arange(1, len(values) + 1)
    ax1.plot(idx, values, "o-", ms=4)
    if "spectrum/ci_low" in datasets:
        low, high = np.asarray(datasets["spectrum/ci_low"]), np.asarray(datasets["spectrum/ci_high"])
        ax1.errorbar(idx, values, yerr=np.maximum([values - low, high - values], 0), fmt="none", capsize=3, lw=1,
                     label=f"{float(attrs.get('confidence', 0.95)):.0%} interval, "
                           f"{attrs.get('error_groups')} groups")
        ax1.legend(fontsize=8)
    ax1.set_xlabel("index")
    ax1.set_ylabel("eigenvalue")
    ax1.axhline(0, color="gray", lw=0.5)
    ax1.set_title(f"{matrix_title(attrs)}, {attrs.get('dataset')}, N = {attrs.get('n_samples')}", fontsize=9)
    rel = residuals / np.maximum(np.abs(values), np.finfo(float).tiny)
    ax2.semilogy(idx, np.maximum(rel, 1e-18), "s", ms=4)
    ax2.set_xlabel("index")
    ax2.set_ylabel("‖Hx − λx‖ / |λ|")
    ax2.set_title(f"residuals ({attrs.get('n_matvecs')} HVPs, {attrs.get('n_ranks')} ranks)")
    save(fig, path)
