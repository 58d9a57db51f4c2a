"""A model on data sharded over all ranks: global mean loss, gradient, accuracy and curvature operators.

This is the one place where the shard's sums become means over the global sample
count, so every analysis (spectra, ranks, densities, Newton) sees the same objective:
L(θ) = (1/N) Σᵢ ℓᵢ(θ) over the first N samples of the dataset.

Two curvature matrices of L are available, each as a distributed operator: the
Hessian (`problem.hessian`) and the generalized Gauss-Newton matrix (`problem.ggn`).
`problem.operator` is the one an analysis should run on: the Hessian or the GGN,
over all of θ or restricted to one layer's block of θ (`operator_kind`, `layer`,
`block` say which).
"""

from __future__ import annotations

import numpy as np

from . import data
from .curvature import LocalCurvature
from .errors import HessmpiError
from .models import Model
from .operator import DistributedOperator, ggn_operator, hessian_operator, layer_block, restrict, sum_over_ranks

OPERATORS = ("hessian", "ggn")


class Problem:
    """Loss, gradient and curvature operators of the mean loss over the first n_samples
    training samples, each rank holding its contiguous block.

    `operator` ("hessian" or "ggn") and `layer` (one of operator.layer_names, or None for
    all of θ) choose `self.operator`; `self.hessian` is always the full Hessian.
    """

    def __init__(self, model: Model, dataset: data.Dataset, n_samples: int | None, comm,
                 dtype: str = "float64", micro_batch: int = 1000,
                 hvp_mode: str = "reverse-over-reverse", operator: str = "hessian",
                 layer: str | None = None):
        self.model = model
        self.dataset = dataset
        self.comm = comm
        self.n_samples = n_samples or dataset.n_train
        self.shard = data.shard_range(self.n_samples, comm.Get_size(), comm.Get_rank())
        data.select(dataset, self.n_samples, max(self.n_samples, 1), 0)  # checks n_samples; converts 1 row
        # The shard's uint8 pixels: LocalCurvature scales them inside its TensorFlow functions,
        # so no float copy of the shard exists and memory per rank stays flat (bench/memory.py).
        start, stop = self.shard
        images = dataset.train_images[start:stop]
        labels = np.array(dataset.train_labels[start:stop], dtype=np.int64)
        self.curvature = LocalCurvature(model, images, labels, dtype, micro_batch, hvp_mode)
        self.hessian: DistributedOperator = hessian_operator(self.curvature, self.n_samples, comm)
        self.ggn: DistributedOperator = ggn_operator(self.curvature, self.n_samples, comm)
        self.n_params = model.n_params
        self.theta = None
        self.operator_kind, self.layer = operator, layer
        self.operator: DistributedOperator = self.operator_for(operator, layer)
        self.block = layer_block(model, layer) if layer else slice(0, self.n_params)

    def operator_for(self, kind: str = "hessian", layer: str | None = None) -> DistributedOperator:
        """The Hessian or GGN operator, over all of θ (the shared `self.hessian` /
        `self.ggn` objects) or restricted to one layer's block (a new operator)."""
        if kind not in OPERATORS:
            raise HessmpiError(f"unknown operator {kind!r}: choose one of {', '.join(OPERATORS)}")
        full = self.hessian if kind == "hessian" else self.ggn
        if layer is None:
            return full
        block = layer_block(self.model, layer)
        return restrict(full, block.start, block.stop)

    def shard_product(self, v: np.ndarray, samples: slice | None = None) -> np.ndarray:
        """Σᵢ Pᵢ·v over this rank's shard rows `samples` (all if None) for the matrix P of
        `self.operator` (its block if a layer was chosen; v has the operator's size).
        Not divided by the sample count. Local: no communication."""
        product = self.curvature.hvp if self.operator_kind == "hessian" else self.curvature.ggn
        if self.layer is None:
            return product(v, samples)
        full = np.zeros(self.n_params)
        full[self.block] = v
        return product(full, samples)[self.block]

    def set_params(self, theta: np.ndarray) -> None:
        """Move every rank to the point θ (the same θ must be passed on every rank)."""
        self.theta = np.array(theta, dtype=np.float64)
        self.curvature.set_params(self.theta)

    def loss_grad(self) -> tuple[float, np.ndarray]:
        """(mean loss, mean gradient) over all ranks' samples at the current θ."""
        loss, grad = self.curvature.loss_grad()
        return (sum_over_ranks(self.comm, loss) / self.n_samples,
                sum_over_ranks(self.comm, grad) / self.n_samples)

    def train_accuracy(self) -> float:
        """Fraction of the n_samples training samples classified correctly at θ."""
        return sum_over_ranks(self.comm, self.curvature.n_correct()) / self.n_samples
