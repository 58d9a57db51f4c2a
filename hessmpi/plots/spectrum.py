"""The figure of a spectrum: eigenvalues with error bars, and relative residuals."""

from __future__ import annotations

import numpy as np

from .common import finish, matrix_title, subplots


def spectrum(datasets: dict, attrs: dict, path: str | None = None, comm=None):
    """Eigenvalues against their index (with their confidence intervals if the datasets hold
    them), and their relative residuals: a figure, saved to path if given; the title names
    the matrix (attrs "operator", "layer")."""
    values = np.asarray(datasets["spectrum/eigenvalues"])
    residuals = np.asarray(datasets["spectrum/residuals"])
    fig, (ax1, ax2) = subplots(1, 2, figsize=(10, 4))
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
    return finish(fig, path, comm)
