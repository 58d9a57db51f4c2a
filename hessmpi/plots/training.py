"""Figures of training runs: one run's history, and several runs against data sweeps and wall time."""

from __future__ import annotations

import os

import numpy as np

from .common import finish, subplots


def _label(attrs: dict, path: str) -> str:
    return f"{attrs.get('method', '?')} ({os.path.basename(path)})"


def history(datasets: dict, attrs: dict, path: str | None = None, comm=None):
    """Objective, gradient norm and accuracies of one run against data sweeps, as a PNG."""
    sweeps = np.asarray(datasets["newton/sweeps"])
    fig, (ax1, ax2, ax3) = subplots(1, 3, figsize=(14, 4))
    ax1.semilogy(sweeps, datasets["newton/loss"] - np.min(datasets["newton/loss"]) + 1e-16, "o-", ms=3)
    ax1.set_ylabel("F − min F")
    ax2.semilogy(sweeps, np.maximum(datasets["newton/grad_norm"], 1e-300), "o-", ms=3)
    ax2.set_ylabel("‖∇F‖")
    ax3.plot(sweeps, datasets["newton/train_accuracy"], "o-", ms=3, label="train")
    ax3.plot(sweeps, datasets["newton/test_accuracy"], "s-", ms=3, label="test")
    ax3.set_ylabel("accuracy")
    ax3.legend()
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("data sweeps")
    fig.suptitle(f"{attrs.get('method')} on {attrs.get('model')}, {attrs.get('dataset')} "
                 f"(N = {attrs.get('n_samples')}, γ = {attrs.get('gamma')}, {attrs.get('regularization')})")
    return finish(fig, path, comm)


def compare(runs: list, path: str | None = None, comm=None):
    """Loss and test accuracy against data sweeps and against wall time, one curve per
    run; runs is a list of (path, datasets, attrs)."""
    fig, axes = subplots(2, 2, figsize=(12, 8))
    for name, datasets, attrs in runs:
        label = _label(attrs, name)
        for col, x in enumerate(("newton/sweeps", "newton/wall_time")):
            axes[0, col].semilogy(datasets[x], datasets["newton/loss"], ".-", label=label)
            axes[1, col].plot(datasets[x], datasets["newton/test_accuracy"], ".-", label=label)
    for col, xlabel in enumerate(("data sweeps (gradient = 1, HVP = 2)", "wall time in the method (s)")):
        axes[0, col].set_ylabel("objective F (training)")
        axes[1, col].set_ylabel("test accuracy")
        for row in range(2):
            axes[row, col].set_xlabel(xlabel)
            axes[row, col].set_xscale("symlog", linthresh=1.0)
    start = max(float(d["newton/loss"][0]) for _, d, _ in runs)
    for col in range(2):  # a diverging run leaves the chart instead of flattening the others
        axes[0, col].set_ylim(top=10 * start)
    later = np.concatenate([np.asarray(d["newton/test_accuracy"])[1:] for _, d, _ in runs])
    later = later[np.isfinite(later)]
    if later.size:  # the interesting range, not the 10% of the initial guess
        for col in range(2):
            axes[1, col].set_ylim(max(0.0, np.percentile(later, 5) - 0.02), min(1.0, later.max() + 0.01))
    axes[0, 0].legend(fontsize=8)
    first = runs[0][2]
    fig.suptitle(f"{first.get('model')} on {first.get('dataset')}, N = {first.get('n_samples')}")
    return finish(fig, path, comm)
