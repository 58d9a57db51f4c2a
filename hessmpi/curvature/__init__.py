"""Curvature: local products on a rank's samples, the distributed operators and their arithmetic,
the PETSc wrapping, the problem that ties a model, a loss and data together, and regularizers."""

from .local import HVP_MODES, LocalCurvature
from .operator import (BlockOperator, CurvatureOperator, DistributedOperator, Identity, LinearOperator,
                       MatrixOperator, SumOperator, sum_over_ranks)
from .problem import OPERATORS, Problem, check_fit

__all__ = ["BlockOperator", "CurvatureOperator", "DistributedOperator", "HVP_MODES", "Identity", "LinearOperator",
           "LocalCurvature", "MatrixOperator", "OPERATORS", "Problem", "SumOperator", "check_fit",
           "sum_over_ranks"]
