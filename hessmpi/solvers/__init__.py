"""Solvers on curvature operators: eigenpairs (SLEPc) with error bars, spectral density and
trace, rank curves, and checks of the derivatives."""

from .batch_rank import RankCurve, rank_curve
from .density import Density, Smoothing, resmooth, spectral_density
from .spectrum import Eigenpairs, eigenpairs
from .trace import Trace
from .trace import estimate as estimate_trace

__all__ = ["Density", "Eigenpairs", "RankCurve", "Smoothing", "Trace", "eigenpairs", "estimate_trace", "rank_curve",
           "resmooth", "spectral_density"]
