"""Figure of a Hessian monitor's records (hessmpi.keras.HessianMonitor) against training time."""

from __future__ import annotations

import numpy as np

from .common import finish, matrix_title, subplots


def monitor(datasets: dict, attrs: dict, path: str | None = None, comm=None):
    """Top eigenvalues, trace and fraction of eigenvalues below −σ against the training time
    (monitoring excluded), one panel for each that was recorded."""
    x = np.asarray(datasets["monitor/train_time"])
    panels = []
    top = np.atleast_2d(np.asarray(datasets["monitor/top_eigenvalues"]).T)
    if top.size and np.isfinite(top).any():
        panels.append(("top eigenvalues", [(f"λ{i + 1}", values, None) for i, values in enumerate(top)]))
    for name, label in (("trace", "trace"), ("negative_mass", "fraction of eigenvalues below −σ")):
        values = np.asarray(datasets[f"monitor/{name}"])
        if np.isfinite(values).any():
            panels.append((label, [(label, values, np.asarray(datasets[f"monitor/{name}_stderr"]))]))
    fig, axes = subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, (ylabel, curves) in zip(axes[0], panels):
        for label, values, stderr in curves:
            ax.plot(x, values, "o-", ms=3, label=label)
            if stderr is not None:
                ax.fill_between(x, values - 2 * stderr, values + 2 * stderr, alpha=0.25, lw=0)
        ax.set_xlabel("training time (s, monitoring excluded)")
        ax.set_ylabel(ylabel)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    unit = attrs.get("unit", "epoch")
    fig.suptitle(f"{matrix_title(attrs)} on {attrs.get('n_samples')} evaluation samples, every "
                 f"{attrs.get('every')} {unit}(s)")
    fig.tight_layout()
    return finish(fig, path, comm)
