"""Watching the Hessian during `model.fit`: the Keras callback `HessianMonitor`.

    from hessmpi.keras import HessianMonitor
    monitor = HessianMonitor((x_eval, y_eval), "hessian.h5")
    model.fit(x, y, epochs=10, callbacks=[monitor])
    monitor.plot()

Every `every` epochs (or steps), and once before training, the monitor measures the
curvature of the model's loss on a fixed evaluation set at the current weights: the top
eigenvalues (SLEPc, warm-started from the previous record's eigenvectors), the trace
(Hutch++) and the spectral mass below zero (stochastic Lanczos quadrature: the fraction
of eigenvalues below −σ, σ the quadrature's smoothing width; below −σ the sign of an
eigenvalue is resolved, nearer zero it is not). Each record is a row of /monitor/* in the
results file, rewritten atomically after every record.

Under mpirun every rank runs the same `model.fit` (the same model, data, seeds, epochs and
steps) with the monitor; the evaluation set is split over the ranks. A record refuses
ranks whose weights differ. Importing this module imports Keras.
"""

from __future__ import annotations

import time

import keras
import numpy as np

from . import api, results, runtime
from .errors import HessmpiError
from .solvers import eigenpairs, estimate_trace, spectral_density

UNITS = ("epoch", "step")
AGREEMENT = 1e-6  # how far (relative) the ranks' weights may differ before the monitor refuses them
COLUMNS = ("epoch", "step", "train_time", "monitor_time", "top_eigenvalues", "trace", "trace_stderr",
           "negative_mass", "negative_mass_stderr", "negative_threshold", "n_matvecs", "train_loss")


class HessianMonitor(keras.callbacks.Callback):
    """Records the curvature of the model's loss on `data` during `model.fit`.

    data: the evaluation set, anything `hessmpi.Hessian` takes (an (x, y) pair, an .npz
    path, a tf.data.Dataset), of which the first n_samples. path: the HDF5 file rewritten
    after every record (None: kept in memory only). every, unit: a record every `every`
    epochs ('epoch') or optimizer steps ('step'), and one before training.
    top: how many of the largest eigenvalues (0: none), to the relative residual `tol`.
    trace_products: the products of a Hutch++ trace estimate (0: none). mass_probes,
    mass_steps: the SLQ probes and Lanczos steps of the mass below −σ (0 probes: none).
    operator: 'hessian' or 'ggn'. loss, dtype, micro_batch: as for hessmpi.Hessian (loss
    None: the model's compiled loss). log(str) gets a line per record (default: rank 0
    prints); comm: the ranks (default MPI_COMM_WORLD).

    After training, `datasets` holds the records ({'monitor/<column>': array}: the epoch and
    the optimizer steps so far, the training time without the monitor's, the measurements,
    their products) and `plot()` draws them against training time.
    """

    def __init__(self, data, path: str | None = None, *, every: int = 1, unit: str = "epoch", top: int = 1,
                 trace_products: int = 12, mass_probes: int = 2, mass_steps: int = 20, tol: float = 1e-3,
                 operator: str = "hessian", loss=None, dtype: str | None = None, n_samples: int | None = None,
                 micro_batch: int = 1000, seed: int = 0, comm=None, log=None):
        super().__init__()
        for ok, message in [(unit in UNITS, f"unit must be one of {', '.join(UNITS)}, got {unit!r}"),
                            (every >= 1, f"every must be at least 1, got {every}"),
                            (top >= 0 and trace_products >= 0 and mass_probes >= 0,
                             "top, trace_products and mass_probes must not be negative"),
                            (trace_products == 0 or trace_products >= 3,
                             f"trace_products must be 0 or at least 3 (Hutch++), got {trace_products}"),
                            (mass_probes == 0 or mass_steps >= 1, f"mass_steps must be at least 1, got {mass_steps}"),
                            (operator in ("hessian", "ggn"), f"operator must be 'hessian' or 'ggn', got {operator!r}"),
                            (top or trace_products or mass_probes, "nothing to record: top, trace_products and "
                                                                   "mass_probes are all 0")]:
            if not ok:
                raise HessmpiError(message)
        self.data, self.path, self.every, self.unit = data, path, every, unit
        self.top, self.trace_products, self.mass_probes, self.mass_steps = top, trace_products, mass_probes, mass_steps
        self.tol, self.operator, self.seed = tol, operator, seed
        self.problem_args = dict(loss=loss, dtype=dtype, n_samples=n_samples, micro_batch=micro_batch, comm=comm)
        self.log = runtime.say if log is None else log
        self.problem = None
        self.rows: list[dict] = []
        self.vectors = None  # the last record's top eigenvectors: the next record's start
        self.epoch = self.step = 0
        self.monitor_time = 0.0
        self.t0 = None
        if unit == "step":  # a batch hook only when needed: with one, Keras waits for every step
            self.on_train_batch_end = self._on_step

    # ---------------------------------------------------------------- Keras' hooks

    def on_train_begin(self, logs=None):
        if self.problem is None or self.problem.model.source is not self.model:
            self.problem = api.problem(self.model, self.data, **self.problem_args)
            self.rows, self.vectors, self.monitor_time, self.step = [], None, 0.0, 0
        self.t0 = time.perf_counter() - (self.rows[-1]["train_time"] + self.monitor_time if self.rows else 0.0)
        if not self.rows:
            self.record(logs)

    def _on_step(self, batch, logs=None):
        self.step += 1
        if self.step % self.every == 0:
            self.record(logs)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch = epoch + 1
        if self.unit == "epoch":
            self.step = self.epoch * ((self.params or {}).get("steps") or 0)
            if self.epoch % self.every == 0:
                self.record(logs)

    # ---------------------------------------------------------------- the records

    def record(self, logs=None) -> dict:
        """Measure the curvature at the model's weights now and append a row. Collective."""
        start = time.perf_counter()
        problem = self.problem
        problem.set_params(self._agreed_params())
        op = problem.operator_for(self.operator)
        before = op.n_matvecs
        row = {"epoch": self.epoch, "step": self.step, "train_time": start - self.t0 - self.monitor_time,
               "top_eigenvalues": np.full(self.top, np.nan), "trace": np.nan, "trace_stderr": np.nan,
               "negative_mass": np.nan, "negative_mass_stderr": np.nan, "negative_threshold": np.nan,
               "train_loss": float((logs or {}).get("loss", np.nan))}
        quiet = lambda line: None  # noqa: E731
        if self.top:
            pairs = eigenpairs(op, k=self.top, tol=self.tol, max_passes=1, error_groups=0, seed=self.seed,
                               start=self.vectors, ncv=self.top + 7, prefix="monitor_", log=quiet)
            row["top_eigenvalues"][:pairs.k] = pairs.values
            self.vectors = pairs.vectors
        if self.trace_products:
            trace = estimate_trace(op, products=self.trace_products, seed=self.seed)
            row["trace"], row["trace_stderr"] = trace.value, trace.stderr
        if self.mass_probes:
            density = spectral_density(op, probes=self.mass_probes, steps=self.mass_steps, hutchpp=0,
                                       seed=self.seed, log=quiet)
            row["negative_mass"] = float(density.datasets["density/mass_below_minus_width"])
            row["negative_mass_stderr"] = float(density.datasets["density/mass_below_minus_width_stderr"])
            row["negative_threshold"] = -float(density.datasets["density/width"])
        row["n_matvecs"] = op.n_matvecs - before
        self.monitor_time += time.perf_counter() - start
        row["monitor_time"] = self.monitor_time
        self.rows.append(row)
        self.log(self.describe(row))
        if self.path:
            self.save(self.path)
        return row

    def _agreed_params(self) -> np.ndarray:
        """Rank 0's θ, once every rank's weights and floating statistics (BatchNormalization's)
        are found equal to rank 0's; HessmpiError on every rank if they differ."""
        from mpi4py import MPI

        comm, model = self.problem.comm, self.problem.model
        theta = model.params()
        tensors = [theta] + [np.asarray(v.numpy(), dtype=np.float64).ravel() for v in
                             model.source.non_trainable_variables if "float" in str(v.dtype)]
        root = [t.copy() for t in tensors]
        for t in root:
            comm.Bcast(t, root=0)
        gap = max(float(np.abs(t - t0).max(initial=0.0) / max(np.abs(t0).max(initial=0.0), 1.0))
                  for t, t0 in zip(tensors, root))
        gap = comm.allreduce(gap, op=MPI.MAX)
        if gap > AGREEMENT:
            raise HessmpiError(f"the ranks' models differ (by {gap:.2g} relative): "
                               f"under mpirun every rank must train the same model on the same data with the "
                               f"same seeds (keras.utils.set_random_seed) for the monitor to measure it",
                               collective=True)
        return root[0]

    @staticmethod
    def describe(row: dict) -> str:
        parts = [f"hessian monitor: epoch {row['epoch']}, step {row['step']}"]
        if np.size(row["top_eigenvalues"]):
            parts.append("top " + ", ".join(f"{v:.5g}" for v in row["top_eigenvalues"]))
        if np.isfinite(row["trace"]):
            parts.append(f"trace {row['trace']:.5g} ± {row['trace_stderr']:.2g}")
        if np.isfinite(row["negative_mass"]):
            parts.append(f"mass below {row['negative_threshold']:.2g} {row['negative_mass']:.4f} ± "
                         f"{row['negative_mass_stderr']:.2g}")
        parts.append(f"{row['n_matvecs']} products, {row['monitor_time']:.1f} s monitoring "
                     f"of {row['train_time'] + row['monitor_time']:.1f} s")
        return "; ".join(parts)

    @property
    def datasets(self) -> dict:
        """The records as {'monitor/<column>': array, one row per record}, θ and its layout."""
        if self.problem is None:
            raise HessmpiError("the monitor has recorded nothing: pass it to model.fit(callbacks=[...])")
        from .solvers.spectrum import model_datasets

        columns = {f"monitor/{c}": np.array([row[c] for row in self.rows]) for c in COLUMNS}
        return {**columns, **model_datasets(self.problem)}

    def attrs(self) -> dict:
        return {**self.problem.attrs(), "operator": self.operator, "every": self.every, "unit": self.unit,
                "top": self.top, "tol": self.tol, "trace_products": self.trace_products,
                "mass_probes": self.mass_probes, "mass_steps": self.mass_steps, "seed": self.seed}

    def save(self, path: str) -> str:
        """Write the records so far to path (rank 0, atomically)."""
        results.save(path, self.datasets, self.attrs(), self.problem.comm)
        return path

    def plot(self, path: str | None = None):
        """The records against training time (plots.monitor): a figure, also written to path."""
        from .plots import monitor

        return monitor.monitor(self.datasets, self.attrs(), path, comm=self.problem.comm)
