"""A model on data sharded over all ranks: global mean loss, gradient, accuracy and Hessian.

This is the one place where the shard's sums become means over the global sample
count, so every analysis (spectra, ranks, Newton) sees the same objective:
L(θ) = (1/N) Σᵢ ℓᵢ(θ) over the first N samples of the dataset.
"""

from __future__ import annotations

import numpy as np

from . import data
from .curvature import LocalCurvature
from .models import Model
from .operator import DistributedOperator, hessian_operator


class Problem:
    """Loss, gradient and Hessian operator of the mean loss over the first n_samples
    training samples, each rank holding its contiguous block."""

    def __init__(self, model: Model, dataset: data.Dataset, n_samples: int | None, comm,
                 dtype: str = "float64", micro_batch: int = 1000,
                 hvp_mode: str = "reverse-over-reverse"):
        self.model = model
        self.dataset = dataset
        self.comm = comm
        self.n_samples = n_samples or dataset.n_train
        images, labels = data.select(dataset, self.n_samples, comm.Get_size(), comm.Get_rank(),
                                     dtype=np.float64)
        self.curvature = LocalCurvature(model, images, labels, dtype, micro_batch, hvp_mode)
        self.hessian: DistributedOperator = hessian_operator(self.curvature, self.n_samples, comm)
        self.n_params = model.n_params
        self.theta = None

    def set_params(self, theta: np.ndarray) -> None:
        """Move every rank to the point θ (the same θ must be passed on every rank)."""
        self.theta = np.array(theta, dtype=np.float64)
        self.curvature.set_params(self.theta)

    def loss_grad(self) -> tuple[float, np.ndarray]:
        """(mean loss, mean gradient) over all ranks' samples at the current θ."""
        loss, grad = self.curvature.loss_grad()
        return (self.hessian.allreduce_sum(loss) / self.n_samples,
                self.hessian.allreduce_sum(grad) / self.n_samples)

    def train_accuracy(self) -> float:
        """Fraction of the n_samples training samples classified correctly at θ."""
        return self.hessian.allreduce_sum(self.curvature.n_correct()) / self.n_samples
