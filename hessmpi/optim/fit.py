"""Train a problem's model with one method, recording its history, resumable: `train` and `newton`.

Every method minimizes F(θ) = mean loss + γ/2·θᵀRθ (R: identity or the Laplacian of the
softmax weight images). One row of history per recorded iterate; with a checkpoint file
the results file is rewritten atomically at every row, and a run started again on that
file continues from its last row and ends where an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from .. import results, stop
from ..errors import HessmpiError, Interrupted
from . import training

METHODS = ("newton", "lrsfn", "sgd", "adam", "rmsprop")
FIRST_ORDER = ("sgd", "adam", "rmsprop")
DEFAULT_ITERATIONS = {"newton": 20, "lrsfn": 100, "sgd": 1000, "adam": 1000, "rmsprop": 1000}


@dataclass
class Settings:
    """A training run's settings; `check` fills the method's defaults and names a bad one.

    newton: eta_max, ew_alpha (Eisenstat–Walker), curvature ('hessian' or 'ggn'),
    hessian_batch (sub-sampled Newton), damping σ, preconditioner ('none', 'kronecker'),
    grow_from / grow_factor (a growing sample), gtol. lrsfn: rank, batch_size,
    hessian_batch, damping δ, lr, eig_tol. sgd/adam/rmsprop: lr, batch_size.
    """

    method: str = "newton"
    regularization: str = "l2"
    gamma: float = 1e-3
    iterations: int | None = None
    record_every: int | None = None
    seed: int = 0
    gtol: float = 1e-10
    eta_max: float = 0.5
    ew_alpha: float = 2.0
    curvature: str = "hessian"
    lr: float | None = None
    batch_size: int = 100
    hessian_batch: int | None = None
    preconditioner: str = "none"
    grow_from: int | None = None
    grow_factor: float | None = None
    rank: int = 40
    damping: float | None = None
    eig_tol: float = 1e-2

    def check(self, n_samples: int | None = None) -> "Settings":
        """This settings object with the method's defaults filled in; HessmpiError naming the
        first setting that does not fit the method or is out of range."""
        m = self.method
        if m not in METHODS:
            raise HessmpiError(f"unknown method {m!r}: choose one of {', '.join(METHODS)}")
        if self.iterations is None:
            self.iterations = DEFAULT_ITERATIONS[m]
        if m == "lrsfn" and self.hessian_batch is None:
            self.hessian_batch = 100
        from .newton import PRECONDITIONERS

        if self.preconditioner not in PRECONDITIONERS:
            raise HessmpiError(f"unknown preconditioner {self.preconditioner!r}: choose one of "
                               f"{', '.join(PRECONDITIONERS)}")
        if self.preconditioner != "none" and m != "newton":
            raise HessmpiError(f"--preconditioner applies to --method newton, not {m}")
        if self.hessian_batch is not None and m not in ("newton", "lrsfn"):
            raise HessmpiError(f"--hessian-batch applies to --method newton and lrsfn, not {m}")
        if self.hessian_batch is not None and self.hessian_batch < 1:
            raise HessmpiError(f"--hessian-batch must be at least 1 (omit it for exact Newton), "
                               f"got {self.hessian_batch}")
        if (self.grow_from is not None or self.grow_factor is not None) and m != "newton":
            raise HessmpiError(f"--grow-from and --grow-factor apply to --method newton, not {m}")
        if self.grow_factor is not None and self.grow_from is None:
            raise HessmpiError("--grow-factor needs --grow-from (the first sample size)")
        if self.grow_from is not None:
            if self.grow_from < 1 or (n_samples is not None and self.grow_from > n_samples):
                raise HessmpiError(f"--grow-from must be between 1 and the number of training samples"
                                   f"{f' ({n_samples:,})' if n_samples is not None else ''}, got {self.grow_from}")
            if self.grow_factor is None:
                self.grow_factor = 4.0
            elif not (math.isfinite(self.grow_factor) and self.grow_factor > 1):
                raise HessmpiError(f"--grow-factor must be a finite number > 1, got {self.grow_factor}")
        if self.damping is None:
            self.damping = 1.0 if m == "lrsfn" else 0.0
        elif m not in ("newton", "lrsfn"):
            raise HessmpiError(f"--damping applies to --method newton and lrsfn, not {m}")
        if self.curvature != "hessian" and m != "newton":
            raise HessmpiError(f"--operator {self.curvature} applies to --method newton only "
                               "(lrsfn is saddle-free Newton on the Hessian)")
        if self.record_every is None:
            self.record_every = max(1, self.iterations // 50) if m in FIRST_ORDER else 1
        for name in ("iterations", "record_every"):
            if getattr(self, name) < 1:
                raise HessmpiError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.eta_max < 1:
            raise HessmpiError(f"--eta-max must be in (0, 1), got {self.eta_max}")
        return self

    def identity(self) -> dict:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        keys = ["method", "regularization", "gamma", "record_every", "seed"]
        keys += {"newton": ["eta_max", "ew_alpha", "curvature", "hessian_batch", "damping", "preconditioner",
                            "grow_from", "grow_factor"],
                 "lrsfn": ["lr", "batch_size", "hessian_batch", "rank", "damping", "eig_tol"]}.get(
            self.method, ["lr", "batch_size"])
        return {k: getattr(self, k) for k in keys}


def make_method(settings: Settings, objective, problem, micro_batch: int = 1000):
    """The training method of the settings, on the objective (a training.TrainingMethod)."""
    s = settings
    if s.method == "newton":
        from .newton import NewtonCG

        batches = (training.LocalBatches(problem, micro_batch)
                   if s.hessian_batch or s.preconditioner != "none" or s.grow_from else None)
        return NewtonCG(objective, eta_max=s.eta_max, ew_alpha=s.ew_alpha, curvature=s.curvature,
                        batches=batches, hessian_batch=s.hessian_batch, seed=s.seed, damping=s.damping,
                        preconditioner=s.preconditioner, grow_from=s.grow_from, grow_factor=s.grow_factor or 4.0)
    batches = training.LocalBatches(problem, micro_batch)
    if s.method == "lrsfn":
        from .lrsfn import LowRankSaddleFreeNewton

        return LowRankSaddleFreeNewton(objective, batches, s.seed, rank=s.rank, batch_size=s.batch_size,
                                       hessian_batch=s.hessian_batch, damping=s.damping,
                                       learning_rate=s.lr or 1.0, tol=s.eig_tol)
    from .first_order import KerasOptimizer

    return KerasOptimizer(s.method, objective, batches, s.seed, s.batch_size, s.lr)


@dataclass
class TrainingRun:
    """A run's final θ, its history (training.History) and why it stopped; `save` writes the
    /newton contract, θ and its layout."""

    theta: np.ndarray
    history: training.History
    reason: str
    attrs: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    layout: object = None
    comm: object = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.reason != "stopped"

    def datasets(self) -> dict:
        return training.run_datasets(self.theta, self.history, self.state, self.layout)

    def save(self, path: str, **attrs) -> str:
        """Write the results file (atomically, by rank 0 of the run's ranks); attrs join its root
        attributes. Returns path."""
        results.save(path, self.datasets(), {**self.attrs, **attrs}, self.comm)
        return path

    def plot(self, path: str | None = None):
        """Objective, gradient norm and accuracies against data sweeps (plots.training)."""
        from ..plots import training as training_plots

        return training_plots.history(self.datasets(), self.attrs, path, comm=self.comm)


def progress_line(history: training.History, method: str) -> str:
    """The last history row as one line of progress."""
    from .newton import reason_name

    r = {f: history.last(f) for f in history.rows}
    ksp = (f"  ksp {int(r['ksp_iterations']):4d} {reason_name(r['ksp_reason']):<24}"
           if method == "newton" and r["iteration"] > 0 else "")
    return (f"{int(r['iteration']):6d}  F {r['loss']:.12e}  |g| {r['grad_norm']:.3e}  "
            f"train {r['train_accuracy']:.4f}  test {r['test_accuracy']:.4f}{ksp}  "
            f"step {r['step_length']:.2e}  HVPs {int(r['hvps']):6d}  sweeps {r['sweeps']:9.2f}  "
            f"{r['wall_time']:7.1f} s")


def train(op, method: str = "newton", test=None, n_test: int | None = None, checkpoint: str | None = None,
          resume: bool = True, stop_after: int | None = None, attrs: dict | None = None, config: dict | None = None,
          log=None, **settings) -> TrainingRun:
    """Train the model of op's problem (op: hessmpi.Hessian or GGN; Newton uses that
    curvature) by `method` from its current θ, on every rank, and write the final θ into
    the Keras model's variables. Collective.

    test: test samples (an (x, y) pair, data.Data) for the test accuracy, of which the first
    n_test. checkpoint: a results file rewritten at every recorded row; with resume, a run
    it holds is continued. stop_after: stop after this many iterations of this call, as if
    killed. settings: the fields of Settings (gamma, regularization, iterations, lr, …).
    attrs join the results file's root attributes; config holds further settings a resumed
    run must share (e.g. where the starting weights came from). log(str) receives a line per
    recorded row (default: printed by rank 0).
    """
    import os

    from .. import runtime
    from ..data.samples import as_samples
    from ..errors import NumericalError, agree

    log = runtime.say if log is None else log
    problem = op.problem
    if problem is None or op not in (problem.hessian, problem.ggn):
        raise HessmpiError("training needs a problem's Hessian or GGN over all parameters (hessmpi.Hessian or "
                           "hessmpi.GGN, without layer= and not a sum: the regularization is gamma=)")
    comm = problem.comm
    with agree(comm):  # a setting, the test data or the checkpoint refused: the same error on every rank
        if method == "newton":
            settings.setdefault("curvature", getattr(op, "kind", "hessian"))
        s = Settings(method=method, **settings).check(problem.n_samples)
        if stop_after is not None and stop_after < 0:
            raise HessmpiError(f"--stop-after must be at least 0, got {stop_after}")
        cost = training.Cost()
        test_problem = training.held_out(problem, as_samples(test, n_test, what="--n-test")) if test is not None else None
        objective = training.Objective(problem, s.regularization, s.gamma, cost, test=test_problem)
        method_impl = make_method(s, objective, problem, problem.micro_batch)
        identity = {**{k: problem.attrs()[k] for k in ("model", "dataset", "data_fingerprint", "n_samples", "dtype",
                                                        "loss")},
                    "micro_batch": problem.micro_batch, "hvp_mode": problem.hvp_mode,
                    "n_test": test_problem.n_samples if test_problem else 0, **s.identity(), **(config or {})}
        theta, history = problem.theta.copy(), training.History()
        resumed = comm.bcast(bool(checkpoint and resume and os.path.exists(checkpoint)))  # rank 0's view
        if resumed:
            theta, history, state, _ = training.load_checkpoint(checkpoint, identity, comm)
            method_impl.restore(state)
            cost.restore(history)
    base = {**problem.attrs(), "method": s.method, "regularization": s.regularization, "gamma": s.gamma,
            "config": json.dumps(identity), **(attrs or {})}
    log(f"method {s.method}: F = mean loss + {s.gamma:g}/2·θᵀRθ (R: {s.regularization}); "
        + (f"resuming at iteration {int(history.last('iteration'))} of {checkpoint}" if resumed
           else f"{s.iterations} iterations"))

    def run_attrs(finished: bool, reason: str = "") -> dict:
        return {**base, "n_matvecs": cost.hvps, "iterations": int(history.last("iteration")),
                "converged": int(reason == "gtol"), "finished": int(finished), "stop_reason": reason,
                "sweeps": cost.sweeps, "method_seconds": cost.seconds, "wall_time": cost.seconds,
                "compute_seconds": problem.hessian.compute_seconds, "comm_seconds": problem.hessian.comm_seconds}

    def save_row(theta, history):
        a = run_attrs(False)
        if comm.Get_rank() == 0:
            training.save(checkpoint, theta, history, method_impl.state(), a, problem.model.layout)

    try:
        theta, reason = training.run(method_impl, objective, theta, history, s.iterations, s.record_every,
                                     stop_after, s.gtol if s.method == "newton" else 0.0,
                                     save_row if checkpoint else None, lambda h: log(progress_line(h, s.method)))
    except NumericalError as error:  # found on all-reduced values: every rank is here
        error.collective = True
        raise
    except Interrupted as e:
        raise stop.saved(e, checkpoint, "checkpoint= (--out), resumed with resume=True (--resume)",
                         again="run it again with resume=True (--resume) to continue") from None
    finally:
        if hasattr(method_impl, "destroy"):  # PETSc objects, collectively
            method_impl.destroy()
    problem.set_params(theta)
    problem.model.set_params(theta)  # the Keras model holds the trained weights
    run = TrainingRun(theta, history, reason, run_attrs(reason != "stopped", reason), method_impl.state(),
                      problem.model.layout, comm)
    if checkpoint and comm.Get_rank() == 0:
        training.save(checkpoint, theta, history, run.state, run.attrs, problem.model.layout)
    return run


def newton(op, **kwargs) -> TrainingRun:
    """train(op, method='newton', …): regularized Newton-CG on op's curvature (Hessian or GGN)."""
    return train(op, method="newton", **kwargs)


def comparison_table(runs, target: float | None = None) -> list[str]:
    """One line per training run (runs: (path, datasets, attrs) of results files): method, rows,
    sweeps, wall time, final F, final and best test accuracy; with target, the sweeps and
    seconds at the first recorded iterate whose test accuracy reaches it."""
    import os

    width = max([4] + [len(os.path.basename(path)) for path, _, _ in runs])
    head = (f"{'file':<{width}} {'method':<8} {'iters':>6} {'sweeps':>9} {'time s':>8} {'final F':>12} "
            f"{'test':>7} {'best test':>9} {'@ sweeps':>9}")
    if target is not None:
        head += f" {'sweeps to ' + format(target, '.3f'):>16} {'time s':>8}"
    lines = [head]
    for path, d, attrs in runs:
        acc, sweeps = np.asarray(d["newton/test_accuracy"]), np.asarray(d["newton/sweeps"])
        wall = np.asarray(d["newton/wall_time"])
        best = int(np.nanargmax(acc)) if np.any(np.isfinite(acc)) else 0
        line = (f"{os.path.basename(path):<{width}} {attrs.get('method', '?'):<8} {int(d['newton/iteration'][-1]):>6} "
                f"{sweeps[-1]:>9.2f} {d['newton/wall_time'][-1]:>8.1f} {d['newton/loss'][-1]:>12.6g} "
                f"{acc[-1]:>7.4f} {acc[best]:>9.4f} {sweeps[best]:>9.2f}")
        if target is not None:
            reached = np.flatnonzero(acc >= target)
            line += (f" {sweeps[reached[0]]:>16.2f} {wall[reached[0]]:>8.1f}" if reached.size
                     else f" {'not reached':>16} {'':>8}")
        lines.append(line)
    return lines
