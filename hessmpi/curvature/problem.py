"""A model, its loss and samples over all ranks: global mean loss, gradient, accuracy and curvature operators.

This is the one place where the ranks' sums become means over the global sample count,
so every analysis (spectra, ranks, densities, Newton) sees the same objective:
L(θ) = (1/N) Σᵢ ℓᵢ(θ) + penalty(θ) over the first N samples, penalty being the model's
own regularization terms (zero for most models).

Two curvature matrices of L are available, each as a distributed operator: the
Hessian (`problem.hessian`) and the generalized Gauss-Newton matrix (`problem.ggn`);
`operator_for(kind, layer)` gives either, over all of θ or one layer's diagonal block.
"""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..data.samples import LocalShard, Stream
from ..data.shard import shard_range
from ..errors import DataError, HessmpiError
from .local import LocalCurvature
from .operator import DistributedOperator, LinearOperator, sum_over_ranks

OPERATORS = ("hessian", "ggn")


class Problem:
    """Loss, gradient and curvature operators of the mean loss over `samples` (a data.Data
    or data.Stream, all of whose rows are used), each rank of comm holding its contiguous
    block. θ starts at the model's weights (or `theta`).

    On construction the model is applied to the first sample and the targets are checked
    against the loss (DataError on every rank alike if they do not fit).
    """

    def __init__(self, model, loss, samples, comm=None, micro_batch: int = 1000,
                 hvp_mode: str = "reverse-over-reverse", theta: np.ndarray | None = None):

        self.model, self.loss, self.samples = model, loss, samples
        self.comm = comm if comm is not None else runtime.world()
        self.micro_batch, self.hvp_mode = micro_batch, hvp_mode
        self.n_samples = samples.n
        self.n_params = model.n_params
        self.shard = shard_range(self.n_samples, self.comm.Get_size(), self.comm.Get_rank())
        check_fit(model, loss, samples)
        local = LocalShard(samples, *self.shard, micro_batch, model.dtype)
        self.curvature = LocalCurvature(model, loss, local, hvp_mode,
                                        penalty_weight=self.n_samples if self.comm.Get_rank() == 0 else 0)
        self.hessian = self._operator("hessian")
        self.ggn = self._operator("ggn")
        self.theta = None
        self.set_params(model.params() if theta is None else theta)

    def _operator(self, kind: str) -> DistributedOperator:
        c = self.curvature
        product = c.hvp if kind == "hessian" else c.ggn
        op = DistributedOperator(product, self.n_params, 1.0 / self.n_samples, self.comm,
                                 sample_product=product, fixed_product=c.penalty_hvp if c.penalty else None)
        op.problem, op.kind = self, kind
        return op

    def operator_for(self, kind: str = "hessian", layer: str | None = None) -> LinearOperator:
        """The Hessian or GGN operator, over all of θ (the shared `self.hessian` / `self.ggn`
        objects) or over one layer's (or tensor's) diagonal block (a new operator)."""
        if kind not in OPERATORS:
            raise HessmpiError(f"unknown operator {kind!r}: choose one of {', '.join(OPERATORS)}")
        full = self.hessian if kind == "hessian" else self.ggn
        if layer is None:
            return full
        block = self.model.layout.block(layer)
        op = full.block(block.start, block.stop)
        op.kind, op.layer = kind, layer
        return op

    def set_params(self, theta: np.ndarray) -> None:
        """Move every rank to the point θ (the same θ must be passed on every rank)."""
        self.theta = np.array(theta, dtype=np.float64)
        self.curvature.set_params(self.theta)

    def loss_grad(self) -> tuple[float, np.ndarray]:
        """(mean loss, mean gradient) over all ranks' samples at the current θ, the model's
        penalty included."""
        loss, grad = self.curvature.loss_grad()
        return (sum_over_ranks(self.comm, loss) / self.n_samples,
                sum_over_ranks(self.comm, grad) / self.n_samples)

    def accuracy(self) -> float:
        """Fraction of the samples classified correctly at θ (NaN for a loss that does not
        classify)."""
        correct = self.curvature.n_correct()
        if correct is None:
            return float("nan")
        return sum_over_ranks(self.comm, correct) / self.n_samples

    def subset(self, n: int) -> "Problem":
        """The same problem on the first n samples, at the same θ."""
        if not 1 <= n <= self.n_samples:
            raise DataError(f"a subset of {n} samples is outside 1..{self.n_samples}")
        samples = (Stream(self.samples.dataset, n, self.samples.name) if isinstance(self.samples, Stream)
                   else self.samples.rows(0, n))
        return Problem(self.model, self.loss, samples, self.comm, self.micro_batch, self.hvp_mode, self.theta)

    def attrs(self) -> dict:
        """The root attributes of a results file of this problem (results.ROOT_ATTRS and the loss)."""
        from .. import results

        return {"model": self.model.name, "dataset": self.samples.name, "n_params": self.n_params,
                "n_samples": self.n_samples, "n_ranks": self.comm.Get_size(), "dtype": self.model.dtype,
                "hessmpi_version": results.version(), "command": results.command(), "loss": repr(self.loss),
                "data_fingerprint": self.samples.fingerprint}


def check_fit(model, loss, samples) -> None:
    """DataError unless the model takes the samples' inputs and the targets fit the loss:
    the model is applied to the first sample (on every rank alike)."""
    tf = runtime.import_tensorflow()

    if isinstance(samples, Stream):
        x, y = samples.first()
        x = tf.nest.map_structure(lambda a: np.asarray(a)[None], x)
        y_all = np.asarray(y)[None]
    else:
        first = samples.rows(0, 1)
        x, y_all = first.x, samples.y
        if samples.pixels:
            x = x.astype(model.dtype) / 255
    try:
        outputs = model.outputs(tf.constant(model.params(), model.dtype), x)
    except Exception as e:  # Keras raises ValueError, TypeError, InvalidArgumentError, …
        shapes = [tuple(np.shape(a)[1:]) for a in tf.nest.flatten(x)]
        raise DataError(f"the model {model.name!r} cannot take the data's inputs of shape "
                        f"{shapes[0] if len(shapes) == 1 else shapes} per sample: {_first_line(e)}") from None
    if isinstance(outputs, (list, tuple, dict)):
        raise HessmpiError(f"the model {model.name!r} has several outputs; hessmpi analyses models with one")
    where = f"the targets of {samples.name}"
    loss.check_targets(y_all, tuple(outputs.shape[1:]), where=where)
    try:
        values = loss.per_sample(tf.constant(y_all[:1]), outputs)
        if tuple(values.shape) != (1,):
            raise ValueError(f"one value per sample expected, got shape {tuple(values.shape)}")
    except Exception as e:
        raise DataError(f"{where} (shape {tuple(np.shape(y_all)[1:])} per sample) do not fit the loss "
                        f"{loss.name} on outputs of shape {tuple(outputs.shape[1:])}: {_first_line(e)}") from None
    try:
        extra = model.extra_losses(x)
    except Exception:
        extra = 0
    if extra:
        raise HessmpiError(f"the model {model.name!r} adds {extra} data-dependent loss term(s) when called "
                           f"(activity regularizers or add_loss), which hessmpi does not include; remove them "
                           f"to analyse the model")


def _first_line(error: Exception) -> str:
    """An exception's message on one line, at most 300 characters."""
    return " ".join(str(error).split())[:300]
