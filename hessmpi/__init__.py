"""hessmpi: distributed Hessian analysis of neural networks with TensorFlow, MPI, PETSc and SLEPc.

The public API (everything in `__all__`), the same in a notebook and under mpirun:

    import hessmpi
    H = hessmpi.Hessian(model, (x_train, y_train))   # any built Keras model and its compiled loss
    top = hessmpi.eigenpairs(H, k=10)                 # values, vectors, true residuals, error bars
    top.save("top.h5"); top.plot()

Importing hessmpi starts neither TensorFlow, MPI nor PETSc; each starts on first need.
"""

__version__ = "0.2.0"

from .api import GGN, Hessian, load_dataset, problem, regularizer
from .curvature.operator import Identity, LinearOperator
from .curvature.problem import Problem
from .data import Data, load_npz
from . import stop
from .errors import DataError, HessmpiError, Interrupted, NumericalError, ResultsError
from .models import FlatModel, Layout, load_model
from .optim import TrainingRun, newton, train
from .results import read as read_results
from .solvers import (Density, Eigenpairs, RankCurve, Trace, eigenpairs, rank_curve, resmooth, spectral_density)
from .solvers import estimate_trace as trace
from .solvers.verify import verify


def __getattr__(name):
    """`hessmpi.keras` (the HessianMonitor callback) is imported on first use: it imports Keras."""
    if name == "keras":
        import importlib

        return importlib.import_module(".keras", __name__)
    raise AttributeError(f"module 'hessmpi' has no attribute {name!r}")


__all__ = ["Data", "DataError", "Density", "Eigenpairs", "FlatModel", "GGN", "Hessian", "HessmpiError",
           "Identity", "Interrupted", "Layout", "LinearOperator", "NumericalError", "Problem", "RankCurve", "ResultsError",
           "Trace", "TrainingRun", "eigenpairs", "load_dataset", "load_model", "load_npz", "newton", "problem",
           "rank_curve", "read_results", "regularizer", "resmooth", "spectral_density", "trace", "train",
           "stop", "verify", "__version__"]
