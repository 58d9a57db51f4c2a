"""Figures of a rank-curve results file (matplotlib, no display needed).

`write_all(datasets, attrs, prefix)` draws every figure the file has data for:
  prefix.png               rank against batch size with the bounds, counts above thresholds, dead pixels
  prefix_spy.png           the softmax Hessian's sparsity pattern for a few batch sizes
  prefix_eigenvectors.png  the top eigenvectors as 28×28 images, one per class (softmax)
  prefix_weights.png       the weights as 28×28 images, one per class (softmax, with --weights)
"""

from __future__ import annotations

import numpy as np

from .common import finish, matrix_title, subplots

RC = "rank_curve/"


def _title(attrs) -> str:
    return f"{matrix_title(attrs)}, {attrs.get('dataset')}, {attrs.get('dtype')}, weights: {attrs.get('weights')}"


def curve(datasets: dict, attrs: dict, path: str | None = None, comm=None):
    """Rank against n with the 9·n line and the caps; counts above thresholds; dead pixels."""
    n = np.asarray(datasets[RC + "batch_sizes"])
    ranks = np.asarray(datasets[RC + "ranks"])
    lower = np.asarray(datasets.get(RC + "rank_is_lower_bound", np.zeros_like(ranks))).astype(bool)
    n_params = int(attrs.get("matrix_size", attrs.get("n_params", 0)))
    fig, (ax1, ax2, ax3) = subplots(1, 3, figsize=(16, 4.8))
    exact = (ranks >= 0) & ~lower
    ax1.loglog(n[exact], ranks[exact], "o-", color="C0", lw=2, ms=6, label="rank")
    if np.any(lower):
        ax1.loglog(n[lower], ranks[lower], "^", color="C0", ms=9, mfc="none", label="rank ≥ (lower bound)")
    both = RC + "dense/ranks" in datasets and RC + "matrix_free/ranks" in datasets
    for key, marker, label in (("dense/ranks", "s", "dense"), ("matrix_free/ranks", "x", "matrix-free")):
        if both:
            r = np.asarray(datasets[RC + key])
            ok = r >= 0
            ax1.loglog(n[ok], r[ok], marker, ms=8, mfc="none", label=f"{label} route")
    if RC + "cap_9_rank_x" in datasets or attrs.get("operator") == "ggn":  # rank ≤ 9·n: Gauss-Newton structure
        grid = np.unique(np.geomspace(n.min(), n.max(), 50).round())
        ax1.loglog(grid, 9 * grid, "--", color="gray", label="9·n")
    if RC + "cap_9_rank_x" in datasets:
        ax1.loglog(n, np.asarray(datasets[RC + "cap_9_rank_x"]), ":", color="C3", lw=2, label="9·rank(Xₙ)")
        ax1.loglog(n, np.asarray(datasets[RC + "cap_live_pixels"]), "-.", color="C2",
                   label="9·(live pixels)")
        cap = int(np.asarray(datasets[RC + "cap_shift_invariance"]))
        ax1.axhline(cap, color="C1", lw=1, label=f"shift invariance cap {cap:,}")
    if n_params:
        ax1.axhline(n_params, color="k", lw=0.8, label=f"matrix size {n_params:,}")
    ax1.set_xlabel("batch size n (first n training samples)")
    ax1.set_ylabel("numerical rank")
    ax1.set_title(f"rank (tol {float(attrs.get('tol', np.nan)):.2g}·max|λ|)")
    ax1.legend(fontsize=7, loc="lower right")
    ax1.grid(True, which="both", alpha=0.3)

    counts = np.asarray(datasets.get(RC + "counts", np.empty((len(n), 0))))
    thresholds = np.asarray(datasets.get(RC + "thresholds", []))
    for j, t in enumerate(thresholds):
        ok = counts[:, j] >= 0
        ax2.loglog(n[ok], np.maximum(counts[ok, j], 0.8), "o-", ms=3, label=f"|λ| > {t:.0e}·max|λ|")
    ax2.set_xlabel("batch size n")
    ax2.set_ylabel("eigenvalues above the threshold")
    ax2.set_title("how sharp the rank is")
    ax2.legend(fontsize=7, loc="upper left")
    ax2.grid(True, which="both", alpha=0.3)

    if RC + "dead_pixels" in datasets:
        ax3.semilogx(n, np.asarray(datasets[RC + "dead_pixels"]), "o-", color="C4", label="dead pixels")
        if RC + "rank_x" in datasets:
            ax3.semilogx(n, np.asarray(datasets[RC + "rank_x"]), "s-", color="C5", label="rank(Xₙ)")
        ax3.axhline(784, color="gray", lw=0.8, label="784 pixels")
        ax3.set_xlabel("batch size n")
        ax3.set_ylabel("pixels")
        ax3.set_title("pixels zero in every image; rank of the images")
        ax3.legend(fontsize=7)
        ax3.grid(True, which="both", alpha=0.3)
    else:
        ax3.axis("off")
    fig.suptitle(_title(attrs), fontsize=10)
    return finish(fig, path, comm)


def spy(datasets: dict, attrs: dict, path: str | None = None, panels: int = 4, comm=None):
    """The pixel coupling pattern (H's pattern is this ⊗ a dense 10 × 10 block) for a few n."""
    n = np.asarray(datasets[RC + "batch_sizes"])
    patterns = np.asarray(datasets[RC + "pixel_pattern"])
    picks = np.unique(np.linspace(0, len(n) - 1, min(panels, len(n))).round().astype(int))
    fig, axes = subplots(1, len(picks), figsize=(4 * len(picks), 4.4), squeeze=False)
    for ax, i in zip(axes[0], picks):
        ax.spy(patterns[i], aspect="equal")
        ax.set_title(f"n = {n[i]}: {patterns[i].mean():.1%} of pixel pairs coupled", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle("Softmax Hessian sparsity: pixel p couples to q iff some image has both nonzero "
                 "(each dot is a dense 10×10 block of H)", fontsize=10)
    return finish(fig, path, comm)


def _class_images(ax_row, images, side, symmetric=True, cmap="RdBu_r"):
    lim = np.abs(images).max() or 1.0
    for c, ax in enumerate(ax_row):
        ax.imshow(images[:, c].reshape(side, side), cmap=cmap, vmin=-lim if symmetric else None,
                  vmax=lim if symmetric else None)
        ax.set_xticks([])
        ax.set_yticks([])


def eigenvectors(datasets: dict, attrs: dict, path: str | None = None, comm=None):
    """Each top eigenvector as 10 images (its weights for each class)."""
    vecs = np.asarray(datasets[RC + "top_eigenvectors"])
    values = np.asarray(datasets[RC + "top_eigenvalues"])
    classes = 10
    side = int(round(np.sqrt(vecs.shape[1] // classes)))
    fig, axes = subplots(len(vecs), classes, figsize=(1.3 * classes, 1.45 * len(vecs)), squeeze=False)
    for k, (v, lam) in enumerate(zip(vecs, values)):
        _class_images(axes[k], v.reshape(side * side, classes), side)
        axes[k, 0].set_ylabel(f"λ{k + 1} = {lam:.3g}", fontsize=8)
    for c in range(classes):
        axes[0, c].set_title(f"class {c}", fontsize=8)
    n = int(np.asarray(datasets.get(RC + "top_eigenvectors_batch_size", -1)))
    fig.suptitle(f"top eigenvectors of the Hessian, n = {n} (equal eigenvalues: any basis of the eigenspace)",
                 fontsize=10)
    return finish(fig, path, comm)


def weights(datasets: dict, attrs: dict, path: str | None = None, comm=None):
    """The weight vector as one image per class."""
    theta = np.asarray(datasets["model/params"])
    classes = 10
    side = int(round(np.sqrt(theta.size // classes)))
    fig, axes = subplots(1, classes, figsize=(1.3 * classes, 1.7), squeeze=False)
    _class_images(axes[0], theta.reshape(side * side, classes), side)
    for c in range(classes):
        axes[0, c].set_title(f"class {c}", fontsize=8)
    fig.suptitle(f"weights ({attrs.get('weights')})", fontsize=10)
    return finish(fig, path, comm)


def write_all(datasets: dict, attrs: dict, prefix: str | None = None, comm=None) -> list:
    """Every figure the data allows: written as prefix*.png (by rank 0 of comm; returns the
    paths) if prefix is given, else returned as figures."""
    softmax = bool(attrs.get("closed_form", attrs.get("model") == "softmax"))  # weights as 28×28 images
    theta = datasets.get("model/params")
    figures = [("", curve)]
    if RC + "pixel_pattern" in datasets:
        figures.append(("_spy", spy))
    if softmax and RC + "top_eigenvectors" in datasets:
        figures.append(("_eigenvectors", eigenvectors))
    if softmax and theta is not None and np.any(np.asarray(theta) != 0):
        figures.append(("_weights", weights))
    if prefix is None:
        return [draw(datasets, attrs) for _, draw in figures]
    for suffix, draw in figures:
        draw(datasets, attrs, prefix + suffix + ".png", comm=comm)
    return [prefix + suffix + ".png" for suffix, _ in figures]
