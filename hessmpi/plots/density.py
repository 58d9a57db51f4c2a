"""Figures of a density results file: the smoothed spectral density and its log-scale bulk."""

from __future__ import annotations

import numpy as np

from .common import finish, matrix_title, subplots


def density(datasets: dict, attrs: dict, path: str | None = None, reference=None, comm=None):
    """Two panels as a PNG: the density φ(λ) on a log axis (the outliers and the bulk
    at once), and the mass per decade of |λ| for positive and negative λ (the bulk
    near zero), with the trace, the mass below zero and the smoothing widths.

    reference: exact eigenvalues, if known, drawn smoothed with the same width (dashed)."""
    grid, values = np.asarray(datasets["density/grid"]), np.asarray(datasets["density/values"])
    width = float(datasets["density/width"])
    fig, (ax1, ax2) = subplots(1, 2, figsize=(12, 4.2))
    floor = values.max() * 1e-12
    ax1.semilogy(grid, np.maximum(values, floor), lw=1, label="SLQ")
    if reference is not None:
        lam = np.asarray(reference, dtype=float)
        exact = _smoothed(grid, lam, width)
        ax1.semilogy(grid, np.maximum(exact, floor), "--", lw=1, label="exact eigenvalues, same σ")
        ax1.legend(fontsize=8, loc="lower center")
    ax1.set_ylim(bottom=max(floor, values.max() * 1e-8))
    ax1.axvline(0, color="gray", lw=0.5)
    ax1.set_xlabel("eigenvalue λ")
    ax1.set_ylabel("density (integrates to 1)")
    ax1.set_title(f"{matrix_title(attrs)}, {attrs.get('dataset')}, N = {attrs.get('n_samples')}; "
                  f"σ = {width:.3g}", fontsize=9)
    tr, se = float(datasets["trace/estimate"]), float(datasets["trace/stderr"])
    neg = float(datasets["density/negative_mass"])
    text = f"trace = {tr:.4g} ± {se:.2g}\nmass below −ε: {neg:.3f}"
    if "trace/hutchpp/estimate" in datasets:
        text += f"\nHutch++: {float(datasets['trace/hutchpp/estimate']):.4g} ± " \
                f"{float(datasets['trace/hutchpp/stderr']):.2g}"
    ax1.text(0.97, 0.97, text, transform=ax1.transAxes, ha="right", va="top", fontsize=8)

    u = np.asarray(datasets["density/log_grid"])
    ax2.plot(u, datasets["density/log_positive"], label="λ > ε", lw=1)
    ax2.plot(u, datasets["density/log_negative"], label="λ < −ε", lw=1)
    eps, zero_mass = float(datasets["density/zero_threshold"]), float(datasets["density/zero_mass"])
    if reference is not None:
        n = len(lam)
        for sign, name in ((1, "λ > ε"), (-1, "λ < −ε")):
            side = np.log10(sign * lam[sign * lam > eps])
            if side.size:
                ax2.plot(u, _smoothed(u, side, float(datasets["density/log_width"])) * side.size / n, "--",
                         lw=1, label=f"exact, {name}")
        zero = f"; exact {np.mean(np.abs(lam) <= eps):.3f}"
    else:
        zero = ""
    ax2.axvline(np.log10(eps), color="gray", lw=0.5, ls=":")
    ax2.set_xlabel("log10 |λ|")
    ax2.set_ylabel("mass per decade")
    ax2.set_title(f"bulk on a log scale (width {float(datasets['density/log_width']):g} decades); "
                  f"mass with |λ| ≤ ε = {eps:.2g}: {zero_mass:.3f}{zero}", fontsize=9)
    ax2.legend(fontsize=8)
    fig.suptitle(f"stochastic Lanczos quadrature: {attrs.get('probes')} probes × {attrs.get('lanczos_steps')} "
                 f"steps, {attrs.get('n_matvecs')} products, {attrs.get('n_ranks')} rank(s)", fontsize=9)
    return finish(fig, path, comm)


def _smoothed(grid, eigenvalues, width):
    """(1/n) Σᵢ N(grid; λᵢ, σ²), in blocks of eigenvalues to bound memory."""
    values = np.zeros_like(grid)
    for block in np.array_split(eigenvalues, max(1, len(eigenvalues) // 256)):
        values += np.exp(-0.5 * ((grid[:, None] - block[None, :]) / width) ** 2).sum(axis=1)
    return values / (len(eigenvalues) * width * np.sqrt(2 * np.pi))
