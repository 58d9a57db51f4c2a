"""Training: regularized Newton-CG (PETSc KSP), low-rank saddle-free Newton, Keras' first-order
optimizers, and the loop that runs them with a history and checkpoints."""

from .fit import METHODS, Settings, TrainingRun, newton, train
from .training import History, TrainingMethod

__all__ = ["History", "METHODS", "Settings", "TrainingMethod", "TrainingRun", "newton", "train"]
