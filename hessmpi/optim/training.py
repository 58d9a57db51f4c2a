"""What every training method shares: the regularized objective on the sharded data,
seeded mini-batches, the per-iteration history, checkpoints, and the loop that runs a method.

The objective is F(θ) = (1/N) Σᵢ ℓᵢ(θ) + γ/2·θᵀRθ over the first N training samples,
R from `hessmpi.curvature.regularizers` (and the model's own regularization terms,
if it has any). Cost is counted in *data sweeps*, the unit of the LRSFN
authors: a gradient over the N samples is 1 sweep, a Hessian-vector product 2, and
the same over a mini-batch of B samples B/N of that. What is computed only to record
the history (accuracies; for stochastic methods the full loss and gradient) is neither
counted in sweeps nor in the wall time.

A run is a sequence of iterations θ₀ → θ₁ → …; history row k describes θ_k: its
objective, gradient norm and accuracies, the cumulative cost spent to reach it, and the
KSP statistics of the step that produced it (zero in row 0). Every row is also a
checkpoint: the results file is rewritten atomically with θ_k, the history and the
method's state, so a killed run resumes from its last row and, every method being a
deterministic function of (seed, iteration), ends where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import time
from typing import Protocol

import numpy as np

from .. import stop
from ..curvature import regularizers
from ..curvature.local import LocalCurvature
from ..curvature.operator import DistributedOperator, Identity, MatrixOperator, sum_over_ranks
from ..data.samples import LocalShard
from ..errors import HessmpiError, Interrupted, NumericalError

HISTORY_FIELDS = ("iteration", "loss", "data_loss", "grad_norm", "train_accuracy", "test_accuracy",
                  "ksp_iterations", "ksp_reason", "step_length", "step_size", "hvps", "sweeps",
                  "wall_time")
HISTORY_GROUP = "newton"
CURVATURES = ("hessian", "ggn")


class Cost:
    """What a run has spent so far: data sweeps, Hessian-vector products, seconds in the method."""

    def __init__(self, sweeps: float = 0.0, hvps: int = 0, seconds: float = 0.0):
        self.sweeps, self.hvps, self.seconds = sweeps, hvps, seconds

    def restore(self, history: "History") -> None:
        """Continue from the cumulative cost of the history's last row (a resumed run)."""
        self.sweeps, self.hvps, self.seconds = (history.last("sweeps"), int(history.last("hvps")),
                                                history.last("wall_time"))


class Objective:
    """F(θ) = mean training loss + γ/2·θᵀRθ on every rank's shard, its gradient, and accuracies.

    `value_grad(θ)` is collective and returns the same (F, ∇F, mean loss) on every rank.
    The last point is cached: asking again for the same θ costs nothing. A call with
    count=False (evaluation for the history) is not charged to `cost`; if the algorithm
    later needs the same point it is charged then.
    """

    def __init__(self, problem, regularization: str, gamma: float, cost: Cost, test=None):
        if not np.isfinite(gamma) or gamma < 0:
            raise HessmpiError(f"--gamma must be a finite number >= 0, got {gamma}")
        self.problem = problem
        self.gamma = float(gamma)
        self.regularization = regularization
        self.cost = cost
        self.test = test  # a Problem on the test samples (for the test accuracy), or None
        self.R = regularizers.matrix(regularization, problem.model)  # the same on every rank
        self._R_operator = MatrixOperator(self.R, problem.comm, regularization)
        self._cache = None  # (θ, F, g, data loss, charged)

    @property
    def comm(self):
        return self.problem.comm

    def curvature(self, data_curvature, shift: float = 0.0):
        """The objective's curvature from the data's (a Hessian or GGN operator): H + γR (+ σI)."""
        op = data_curvature
        if self.gamma:
            op = op + self.gamma * self._R_operator
        if shift:
            op = op + shift * Identity(op.n, op.comm)
        return op

    def penalty(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """(½θᵀRθ, Rθ), the full vector on every rank (R is replicated: no communication)."""
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging run is reported by the caller
            r_theta = self.R @ theta
            return 0.5 * float(theta @ r_theta), r_theta

    def value_grad(self, theta: np.ndarray, count: bool = True) -> tuple[float, np.ndarray, float]:
        """(F(θ), ∇F(θ), mean data loss at θ); one sweep when count and not cached.
        Non-finite values are returned as they are (a line search backs off from them)."""
        c = self._cache
        if c is not None and np.array_equal(c[0], theta):
            if count and not c[4]:
                self.cost.sweeps += 1.0
                self._cache = (*c[:4], True)
            return c[1], c[2], c[3]
        theta = np.array(theta, dtype=np.float64)
        self.problem.set_params(theta)
        loss, grad = self.problem.loss_grad()
        pen, r_theta = self.penalty(theta)
        value, g = loss + self.gamma * pen, grad + self.gamma * r_theta
        if count:
            self.cost.sweeps += 1.0
        self._cache = (theta, value, g, loss, count)
        return value, g, loss

    def accuracies(self, theta: np.ndarray) -> tuple[float, float]:
        """(training accuracy, test accuracy) at θ; NaN without a test set or for a loss that
        does not classify (collective)."""
        self.problem.set_params(theta)
        train = self.problem.accuracy()
        if self.test is None:
            return train, float("nan")
        self.test.set_params(theta)
        return train, self.test.accuracy()


def held_out(problem, test_samples):
    """A Problem on test_samples (data.Data or Stream), with the model, loss and ranks of
    `problem`: what the test accuracy is measured on."""
    from ..curvature.problem import Problem

    return Problem(problem.model, problem.loss, test_samples, problem.comm, problem.micro_batch,
                   problem.hvp_mode, problem.theta)


# ---------------------------------------------------------------- mini-batches


def batch_indices(seed: int, n: int, batch: int, step: int, stream: int = 0) -> np.ndarray:
    """Global indices (in 0..n−1) of mini-batch `step`: the step-th block of `batch` indices
    of a stream that concatenates seeded permutations of 0..n−1, one per epoch.

    A pure function of its arguments, so a resumed run draws the same batches; `stream`
    tells independent streams apart (gradient and Hessian batches).
    """
    if not 1 <= batch <= n:
        raise HessmpiError(f"a batch size must be between 1 and the {n:,} training samples, got {batch}")
    start, stop = step * batch, (step + 1) * batch
    first, last = start // n, (stop - 1) // n
    perms = [np.random.default_rng([seed, stream, epoch]).permutation(n) for epoch in range(first, last + 1)]
    return np.concatenate(perms)[start - first * n:stop - first * n]


class LocalBatches:
    """This rank's training samples, and the curvature of the mini-batch samples it owns.

    samples is the rank's block (data.shard_range) of the n training samples (a data.Data).
    `use(indices)` points one LocalCurvature at the samples of a global mini-batch that
    fall in this block (possibly none), without retracing TensorFlow functions.
    """

    def __init__(self, problem, micro_batch: int = 1000):
        from ..data.samples import Stream

        if isinstance(problem.samples, Stream):
            raise HessmpiError("mini-batches, sub-sampled curvature and growing samples need the samples in "
                               "memory (arrays or .npz), not a tf.data stream")
        self.problem, self.n, self.comm = problem, problem.n_samples, problem.comm
        self.lo, self.hi = problem.shard
        self.samples = problem.samples.rows(self.lo, self.hi)
        self.micro_batch = micro_batch
        self.curvature = LocalCurvature(problem.model, problem.loss, self._shard(self.samples.rows(0, 0)),
                                        problem.hvp_mode)

    def _shard(self, samples) -> LocalShard:
        return LocalShard(samples, 0, samples.n, self.micro_batch, self.problem.model.dtype)

    def mine(self, indices: np.ndarray | None):
        """The samples of global `indices` (None: all n) that this rank owns, as a data.Data."""
        if indices is None:
            return self.samples
        return self.samples.take(np.sort(indices[(indices >= self.lo) & (indices < self.hi)]) - self.lo)

    def features(self, indices: np.ndarray | None) -> np.ndarray:
        """mine(indices)'s inputs as the model sees them, float64 rows (softmax regression)."""
        x = self.mine(indices).features()
        return x.reshape(len(x), -1)

    def use(self, indices: np.ndarray) -> LocalCurvature:
        """The curvature over the samples of `indices` owned by this rank (set θ on it after);
        rank 0 adds the model's penalty, weighted for the batch's mean."""
        self.curvature.set_samples(self._shard(self.mine(indices)),
                                   penalty_weight=len(indices) if self.comm.Get_rank() == 0 else 0)
        return self.curvature

    def gradient(self, objective: Objective, theta: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """∇ of (mean loss over the mini-batch + γ/2·θᵀRθ) at θ, on every rank; charges B/N sweeps."""
        curv = self.use(indices)
        curv.set_params(theta)
        _, grad = curv.loss_grad()
        objective.cost.sweeps += len(indices) / self.n
        g = sum_over_ranks(self.comm, grad) / len(indices)
        if objective.gamma:
            g += objective.gamma * objective.penalty(theta)[1]
        return g

    def hessian(self, theta: np.ndarray, indices: np.ndarray, kind: str = "hessian") -> DistributedOperator:
        """The mean-loss Hessian (kind 'ggn': Gauss-Newton matrix) over the mini-batch at θ,
        as a distributed operator."""
        curv = self.use(indices)
        curv.set_params(theta)
        product = curv.hvp if kind == "hessian" else curv.ggn
        return DistributedOperator(product, curv.n_params, 1.0 / len(indices), self.comm)


class PrefixObjective:
    """F_n(θ) = (1/n) Σ_{i<n} ℓᵢ(θ) + γ/2·θᵀRθ over the first n training samples (dynamic
    sample size methods): each rank computes the terms of the samples of 0..n−1 it owns.

    The data sums are kept per block [b_{j−1}, b_j) of `boundaries` (the sample sizes a run
    visits, ending at N) and added in block order, so F_n at a point whose smaller-sample
    sums are known costs only the new blocks, and a value computed afresh (a resumed run)
    is bit for bit the one computed by increments. `value_grad(θ, n, paid)` charges
    (samples computed)/N sweeps, or (n − paid)/N when the caller says that the first `paid`
    samples at θ were paid for before (the next iteration reuses the accepted trial's sums).
    """

    def __init__(self, objective: Objective, batches: "LocalBatches", boundaries):
        self.objective, self.batches = objective, batches
        self.boundaries = sorted(set(int(b) for b in boundaries))
        if self.boundaries[0] < 1 or self.boundaries[-1] != batches.n:
            raise ValueError(f"block boundaries must lie in 1..{batches.n} and end at it, got {boundaries}")
        self._curvatures = {}
        self._cache = None  # (θ, [(loss sum, gradient sum) per block])

    def _block(self, j: int, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """(Σ loss, Σ gradient) over block j at θ, summed over ranks (collective)."""
        if j not in self._curvatures:
            lo = self.boundaries[j - 1] if j else 0
            b = self.batches
            self._curvatures[j] = LocalCurvature(b.problem.model, b.problem.loss,
                                                 b._shard(b.mine(np.arange(lo, self.boundaries[j]))),
                                                 b.problem.hvp_mode)
        curv = self._curvatures[j]
        curv.set_params(theta)
        loss, grad = curv.loss_grad()
        total = sum_over_ranks(self.batches.comm, np.concatenate([[loss], grad]))
        return float(total[0]), total[1:]

    def value_grad(self, theta: np.ndarray, n: int, paid: int = 0) -> tuple[float, np.ndarray, float]:
        """(F_n(θ), ∇F_n(θ), mean loss of the first n samples at θ) on every rank (collective)."""
        if n not in self.boundaries:
            raise ValueError(f"{n} is not one of the sample sizes {self.boundaries}")
        blocks = self.boundaries.index(n) + 1
        theta = np.array(theta, dtype=np.float64)
        c = self._cache
        sums = list(c[1]) if c is not None and np.array_equal(c[0], theta) else []
        known = self.boundaries[len(sums) - 1] if sums else 0
        for j in range(len(sums), blocks):
            sums.append(self._block(j, theta))
        self.objective.cost.sweeps += max(0, n - max(known, paid)) / self.batches.n
        self._cache = (theta, sums)
        loss, grad = 0.0, np.zeros_like(theta)
        for block_loss, block_grad in sums[:blocks]:
            loss += block_loss
            grad += block_grad
        loss, grad = loss / n, grad / n
        own = self.batches.curvature
        if own.penalty:  # the model's own regularization terms, once
            own.set_params(theta)
            value, g = own.penalty_value_grad()
            loss, grad = loss + value, grad + g
        gamma = self.objective.gamma
        pen, r_theta = self.objective.penalty(theta)
        with np.errstate(over="ignore", invalid="ignore"):
            return loss + gamma * pen, grad + gamma * r_theta, loss


# ---------------------------------------------------------------- history and checkpoints


class History:
    """One row per recorded iterate (HISTORY_FIELDS), kept as lists of floats."""

    def __init__(self, rows: dict | None = None):
        self.rows = {f: list(map(float, (rows or {}).get(f, []))) for f in HISTORY_FIELDS}

    def __len__(self) -> int:
        return len(self.rows["iteration"])

    def append(self, **row) -> None:
        missing = set(HISTORY_FIELDS) - set(row)
        if missing:
            raise ValueError(f"history row lacks {sorted(missing)}")
        for f in HISTORY_FIELDS:
            self.rows[f].append(float(row[f]))

    def last(self, field: str) -> float:
        return self.rows[field][-1]

    def datasets(self) -> dict:
        """{'newton/<field>': array}; iteration, KSP iterations and reasons, HVPs as integers."""
        ints = {"iteration", "ksp_iterations", "ksp_reason", "hvps"}
        return {f"{HISTORY_GROUP}/{f}": np.asarray(v, dtype=np.int64 if f in ints else np.float64)
                for f, v in self.rows.items()}


def run_datasets(theta: np.ndarray, history: History, state: dict, layout=None) -> dict:
    """A run's datasets: θ (and its layout), the history, the method's state under /checkpoint."""
    datasets = history.datasets()
    datasets["model/params"] = theta
    if layout is not None:
        datasets.update(layout.datasets())
    for key, value in state.items():
        datasets[f"checkpoint/{key}"] = np.asarray(value)
    return datasets


def save(path: str, theta: np.ndarray, history: History, state: dict, attrs: dict, layout=None) -> None:
    """Write the results file (atomically, on the calling rank): run_datasets and attrs."""
    from .. import results

    results.write(path, run_datasets(theta, history, state, layout), attrs)


def load_checkpoint(path: str, config: dict, comm):
    """(θ, History, state, attrs) from a results file written by `save` with the same config.

    Rank 0 reads; every rank receives the same values. Raises HessmpiError if the file
    was written by a run with different settings (other than the iteration budget).
    """
    from .. import results

    loaded = None
    error = None
    if comm.Get_rank() == 0:
        try:
            datasets, attrs = results.read(path, "newton")
            loaded = (datasets, attrs)
        except HessmpiError as e:
            error = str(e)
    error, loaded = comm.bcast((error, loaded))
    if error:
        raise HessmpiError(f"--resume: {error}")
    datasets, attrs = loaded
    stored = json.loads(attrs.get("config", "{}"))
    differ = [f"{k}: {stored.get(k)!r} in the file, {v!r} now" for k, v in config.items()
              if stored.get(k) != v]
    if differ:
        raise HessmpiError(f"--resume: {path} was written with other settings ({'; '.join(differ)}); "
                           "run with the same flags, or drop --resume and pass --overwrite to start over")
    history = History({f: datasets[f"{HISTORY_GROUP}/{f}"] for f in HISTORY_FIELDS})
    state = {k[len("checkpoint/"):]: v for k, v in datasets.items() if k.startswith("checkpoint/")}
    return np.asarray(datasets["model/params"], dtype=np.float64), history, state, attrs


# ---------------------------------------------------------------- the loop


class TrainingMethod(Protocol):
    """What `run` needs of a training method (NewtonCG, LowRankSaddleFreeNewton, KerasOptimizer).

    - `step(theta, iteration) -> (theta, info)`: iteration k's step from θ_k, collective; every
      random choice a function of (seed, iteration), so a resumed run makes the same steps.
      info may hold ksp_iterations, ksp_reason, step_length, step_size, and `failed` (a
      reason) when no step could be made. A stop request (Interrupted from a product) may
      end a step; its state must then be as before the step (change it after the products).
    - `state() -> dict` of arrays and `restore(state)`: what a checkpoint must keep besides θ
      (optimizer moments, Eisenstat–Walker history).
    - `hint`: what to try if the run diverges (e.g. "try a smaller --lr").
    """

    hint: str

    def step(self, theta: np.ndarray, iteration: int) -> tuple[np.ndarray, dict]: ...

    def state(self) -> dict: ...

    def restore(self, state: dict) -> None: ...

DIVERGENCE_HINT = "try a larger --gamma, or --dtype float64 if you run in float32"


def divergence_hint(objective: Objective, *remedies: str) -> str:
    """'try A, B or C': the remedies, and --dtype float64 if the objective is computed in float32."""
    curvature = getattr(objective.problem, "curvature", None)
    if getattr(getattr(curvature, "dtype", None), "name", "") == "float32":
        remedies += ("--dtype float64",)
    return "try " + (", ".join(remedies[:-1]) + " or " if len(remedies) > 1 else "") + remedies[-1]


def check_finite(iteration: int, what: str, *values, hint: str = DIVERGENCE_HINT) -> None:
    """Raise NumericalError naming the iteration if any of `values` (scalars or arrays) is
    not finite. Callers pass all-reduced or replicated values, so every rank raises together."""
    if not all(np.all(np.isfinite(v)) for v in values):
        raise diverged(iteration, f"the {what} is not finite", hint)


def diverged(iteration: int, what: str, hint: str = DIVERGENCE_HINT) -> NumericalError:
    """The NumericalError of a run that diverged in `iteration` because of `what`."""
    return NumericalError(f"the run diverged in iteration {iteration}: {what}; {hint} (no results were "
                          "written; an earlier checkpoint is left as it was)")


def record(history: History, objective: Objective, theta: np.ndarray, iteration: int,
           step: dict | None = None, hint: str = DIVERGENCE_HINT) -> None:
    """Append the row of iterate θ (collective); NumericalError if F or ∇F at θ is not finite."""
    value, g, loss = objective.value_grad(theta, count=False)
    check_finite(iteration, "objective or its gradient over all training samples", value, g, hint=hint)
    train, test = objective.accuracies(theta)
    step = step or {}
    c = objective.cost
    history.append(iteration=iteration, loss=value, data_loss=loss, grad_norm=float(np.linalg.norm(g)),
                   train_accuracy=train, test_accuracy=test,
                   ksp_iterations=step.get("ksp_iterations", 0), ksp_reason=step.get("ksp_reason", 0),
                   step_length=step.get("step_length", 0.0), step_size=step.get("step_size", 0.0),
                   hvps=c.hvps, sweeps=c.sweeps, wall_time=c.seconds)


def run(method, objective: Objective, theta: np.ndarray, history: History, iterations: int,
        record_every: int = 1, stop_after: int | None = None, gtol: float = 0.0,
        checkpoint=None, log=None) -> tuple[np.ndarray, str]:
    """Iterate `method.step(θ, k) -> (θ, step info)` from the last recorded iteration to `iterations`.

    A row is recorded, then passed to `checkpoint(θ, history)` and `log(history)`, for
    θ₀ (if the history is empty; not checkpointed: resuming from θ₀ is starting afresh),
    every `record_every` iterations and at the last. The loop ends early when a recorded
    gradient norm is at most gtol, when a step fails, or after `stop_after` iterations of
    this process (as if killed; its iterate is then recorded too, so that the checkpoint
    resumes from it). Returns (θ, why it stopped: 'iterations', 'gtol',
    'stopped' or the failure).

    A stop request (`hessmpi.stop`), looked for before every step and in every product of
    a step, records and checkpoints θ_k, the iterate whose step it interrupted (with the
    cost spent to reach it), unless that row is the last one already, and raises
    Interrupted on every rank: the resumed run redoes that step and ends bit for bit where
    an uninterrupted one does.

    Divergence raises NumericalError on every rank, before anything is checkpointed: a
    non-finite θ after a step, a non-finite F or ∇F at a recorded iterate, or whatever the
    method's own checks find (its `hint` attribute says what to try).
    """
    hint = getattr(method, "hint", DIVERGENCE_HINT)

    def row(k, info=None, save=True):
        record(history, objective, theta, k, info, hint)
        if checkpoint and save:
            checkpoint(theta, history)
        if log:
            log(history)

    if not len(history):
        row(0, save=False)
    k = int(history.last("iteration"))
    comm = objective.problem.comm
    for done_here in range(iterations - k):
        if history.last("grad_norm") <= gtol:
            return theta, "gtol"
        if stop_after is not None and done_here >= stop_after:
            if history.last("iteration") != k:  # a checkpoint's θ must be its last row's: resuming starts there
                row(k)
            return theta, "stopped"
        c = objective.cost
        spent = c.sweeps, c.hvps, c.seconds
        t0 = time.perf_counter()
        try:
            stop.check(comm, f"before iteration {k + 1}")
            theta_next, info = method.step(theta, k)
        except Interrupted:
            c.sweeps, c.hvps, c.seconds = spent  # what the interrupted step spent is spent again on resuming
            if history.last("iteration") != k:
                row(k)
            elif k == 0 and checkpoint:  # row 0 is not saved otherwise
                checkpoint(theta, history)
            raise
        theta = theta_next
        objective.cost.seconds += time.perf_counter() - t0
        k += 1
        check_finite(k, "parameter vector", theta, hint=hint)
        if k % record_every == 0 or k == iterations or "failed" in info:
            row(k, info)
            if "failed" in info:
                return theta, info["failed"]
    return theta, "gtol" if history.last("grad_norm") <= gtol else "iterations"
