"""hessmpi: distributed Hessian analysis of neural networks with TensorFlow, MPI, PETSc and SLEPc."""

__version__ = "0.1.0"
