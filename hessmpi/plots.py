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


def spectrum(datasets: dict, attrs: dict, path: str) -> None:
    """Eigenvalues against their index, and their relative residuals, as a PNG."""
    plt = _pyplot()
    values = np.asarray(datasets["spectrum/eigenvalues"])
    residuals = np.asarray(datasets["spectrum/residuals"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    idx = np.arange(1, len(values) + 1)
    ax1.plot(idx, values, "o-", ms=4)
    ax1.set_xlabel("index")
    ax1.set_ylabel("eigenvalue")
    ax1.axhline(0, color="gray", lw=0.5)
    ax1.set_title(f"{attrs.get('model')} Hessian, {attrs.get('dataset')}, N = {attrs.get('n_samples')}")
    rel = residuals / np.maximum(np.abs(values), np.finfo(float).tiny)
    ax2.semilogy(idx, np.maximum(rel, 1e-18), "s", ms=4)
    ax2.set_xlabel("index")
    ax2.set_ylabel("‖Hx − λx‖ / |λ|")
    ax2.set_title(f"residuals ({attrs.get('n_matvecs')} HVPs, {attrs.get('n_ranks')} ranks)")
    save(fig, path)
