"""Quadratic regularizers ½·θᵀRθ as sparse PETSc matrices laid out like the Hessian operator.

- `l2`: R = I.
- `laplacian` (softmax only): R = (LᵀL) ⊗ I₁₀, so ½·θᵀRθ = ½·Σₖ ‖L·Wₖ‖² where Wₖ is
  class k's 28×28 weight image and L the discrete Laplacian with the 3×3 stencil
  [[0.5, 1, 0.5], [1, −6, 1], [0.5, 1, 0.5]] and zero padding. θ stores W (pixels, 10)
  in C order (entry pixel·10 + class), hence the Kronecker order.

The Laplacian penalises rough weight images; every pixel is coupled to its
neighbours, so the directions that the data never touches (always-zero pixels) get
curvature, and H + γR becomes nonsingular.
"""

from __future__ import annotations

import numpy as np

from .errors import HessmpiError

REGULARIZERS = ("l2", "laplacian")
STENCIL = np.array([[0.5, 1.0, 0.5], [1.0, -6.0, 1.0], [0.5, 1.0, 0.5]])


def laplacian_matrix(side: int = 28) -> np.ndarray:
    """L (side² × side², dense): (L·w) is the zero-padded 3×3 stencil applied to image w."""
    n = side * side
    lap = np.zeros((n, n))
    for i in range(side):
        for j in range(side):
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    a, b = i + di, j + dj
                    if 0 <= a < side and 0 <= b < side:
                        lap[i * side + j, a * side + b] = STENCIL[di + 1, dj + 1]
    return lap


def laplacian_penalty(theta: np.ndarray, side: int = 28, n_classes: int = 10) -> float:
    """½·Σₖ‖L·Wₖ‖², computed image by image with the stencil (independent of the matrix)."""
    w = theta.reshape(side, side, n_classes)
    padded = np.pad(w, ((1, 1), (1, 1), (0, 0)))
    conv = sum(STENCIL[a, b] * padded[a:a + side, b:b + side] for a in range(3) for b in range(3))
    return 0.5 * float(np.sum(conv ** 2))


def dense_matrix(kind: str, model) -> np.ndarray:
    """R as a dense array (for tests and small models)."""
    n = model.n_params
    if kind == "l2":
        return np.eye(n)
    _check_laplacian(kind, model)
    lap = laplacian_matrix(model.image_size)
    return np.kron(lap.T @ lap, np.eye(model.layout[0].shape[1]))


def _check_laplacian(kind, model):
    if kind not in REGULARIZERS:
        raise HessmpiError(f"unknown regularization {kind!r}: choose one of {', '.join(REGULARIZERS)}")
    if model.name != "softmax":
        raise HessmpiError("--regularization laplacian acts on the 28×28 weight images of the softmax "
                           "model; use --regularization l2 for the cnn")


def petsc_matrix(kind: str, model, lo: int, hi: int, comm):
    """R as a PETSc AIJ matrix whose rows lo..hi belong to this rank (the operator's layout)."""
    from petsc4py import PETSc

    n = model.n_params
    mat = PETSc.Mat().createAIJ(((hi - lo, n), (hi - lo, n)), comm=comm, nnz=25 if kind == "laplacian" else 1)
    if kind == "l2":
        for i in range(lo, hi):
            mat.setValue(i, i, 1.0)
    else:
        _check_laplacian(kind, model)
        lap = laplacian_matrix(model.image_size)
        block = lap.T @ lap
        classes = model.layout[0].shape[1]
        for i in range(lo, hi):
            pixel, cls = divmod(i, classes)
            cols = np.nonzero(block[pixel])[0]
            mat.setValues(i, (cols * classes + cls).astype(PETSc.IntType), block[pixel, cols])
    mat.assemble()
    mat.setOption(PETSc.Mat.Option.SYMMETRIC, True)
    return mat
