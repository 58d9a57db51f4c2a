"""First-order baselines: TensorFlow's own SGD, Adam and RMSprop on the distributed data.

θ lives in one float64 `tf.Variable`; each step draws a mini-batch from the seeded
global stream (`training.batch_indices`), every rank computes the gradient of the
mini-batch samples it owns, the sums are all-reduced, the regularizer's gradient is
added, and the Keras optimizer applies the update. The optimizer's variables
(iteration count, moments) are the method's state in the checkpoint.
"""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..errors import HessmpiError
from .training import LocalBatches, Objective, batch_indices, check_finite, divergence_hint

OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "rmsprop": "RMSprop"}
DEFAULT_LEARNING_RATES = {"sgd": 0.5, "adam": 1e-3, "rmsprop": 1e-3}


class KerasOptimizer:
    """A `tf.keras.optimizers` optimizer ('sgd', 'adam', 'rmsprop') on mini-batch gradients."""

    def __init__(self, name: str, objective: Objective, batches: LocalBatches, seed: int,
                 batch_size: int = 100, learning_rate: float | None = None):
        tf = runtime.import_tensorflow()
        if name not in OPTIMIZERS:
            raise HessmpiError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
        if not 1 <= batch_size <= batches.n:
            raise HessmpiError(f"--batch-size must be between 1 and the {batches.n:,} training samples, "
                               f"got {batch_size}")
        lr = DEFAULT_LEARNING_RATES[name] if learning_rate is None else learning_rate
        if not lr > 0:
            raise HessmpiError(f"--lr must be positive, got {lr}")
        self.objective, self.batches, self.seed, self.batch_size = objective, batches, seed, batch_size
        self.learning_rate = lr
        self.hint = divergence_hint(objective, f"a smaller --lr (this run: {lr:g})", "a larger --gamma")
        self.variable = tf.Variable(np.zeros(objective.problem.n_params), dtype=tf.float64, name="theta")
        self.optimizer = getattr(tf.keras.optimizers, OPTIMIZERS[name])(learning_rate=lr)
        self.optimizer.build([self.variable])
        self._tf = tf

    def state(self) -> dict:
        """The optimizer's variables (iteration, learning rate, moments) as arrays."""
        return {f"optimizer/{i}": np.asarray(v.numpy()) for i, v in enumerate(self.optimizer.variables)}

    def restore(self, state: dict) -> None:
        variables = self.optimizer.variables
        keys = [f"optimizer/{i}" for i in range(len(variables))]
        if sorted(keys) != sorted(state):
            raise HessmpiError(f"the checkpoint holds optimizer state {sorted(state)}, expected {keys}")
        for key, v in zip(keys, variables):
            v.assign(state[key])

    def step(self, theta: np.ndarray, iteration: int) -> tuple[np.ndarray, dict]:
        batches = self.batches
        g = batches.gradient(self.objective, theta,
                             batch_indices(self.seed, batches.n, self.batch_size, iteration))
        check_finite(iteration + 1, "mini-batch gradient", g, hint=self.hint)
        self.variable.assign(theta)
        self.optimizer.apply_gradients([(self._tf.constant(g), self.variable)])
        new = self.variable.numpy()
        return new, {"step_size": self.learning_rate, "step_length": float(np.linalg.norm(new - theta))}
