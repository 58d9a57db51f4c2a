"""Quadratic regularizers ½·θᵀRθ as sparse matrices, and as operators to add to a curvature.

- `l2`: R = I.
- `laplacian` (softmax regression only): R = (LᵀL) ⊗ I₁₀, so ½·θᵀRθ = ½·Σₖ ‖L·Wₖ‖² where
  Wₖ is class k's 28×28 weight image and L the discrete Laplacian with the 3×3 stencil
  [[0.5, 1, 0.5], [1, −6, 1], [0.5, 1, 0.5]] and zero padding. θ stores W (pixels, 10)
  in C order (entry pixel·10 + class), hence the Kronecker order.

The Laplacian penalises rough weight images; every pixel is coupled to its
neighbours, so the directions that the data never touches (always-zero pixels) get
curvature, and H + γR becomes nonsingular. R is small and sparse (25 entries a row at
most), so every rank holds all of it: `R @ θ` needs no communication.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import HessmpiError

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


def image_side(model) -> tuple[int, int]:
    """(side, classes) of softmax regression's (side², classes) weights; HessmpiError for
    another model."""
    check(model, "laplacian")
    pixels, classes = model.layout[0].shape
    return math.isqrt(pixels), classes


def check(model, kind: str) -> None:
    """HessmpiError unless `kind` is a regularizer that applies to the model."""
    if kind not in REGULARIZERS:
        raise HessmpiError(f"unknown regularization {kind!r}: choose one of {', '.join(REGULARIZERS)}")
    if kind == "laplacian" and getattr(model, "kind", None) != "softmax":
        raise HessmpiError("--regularization laplacian acts on the 28×28 weight images of the softmax "
                           "model; use --regularization l2 for other models")


def matrix(kind: str, model):
    """R as a scipy sparse (CSR) matrix of the model's size."""
    import scipy.sparse

    check(model, kind)
    if kind == "l2":
        return scipy.sparse.identity(model.n_params, format="csr")
    side, classes = image_side(model)
    lap = scipy.sparse.csr_matrix(laplacian_matrix(side))
    return scipy.sparse.kron(lap.T @ lap, scipy.sparse.identity(classes), format="csr")


def dense_matrix(kind: str, model) -> np.ndarray:
    """R as a dense array (for tests and small models)."""
    return matrix(kind, model).toarray()


def operator(kind: str, model, comm):
    """R as an operator over comm, to add to a curvature: H + gamma * operator(...)."""
    from .operator import MatrixOperator

    return MatrixOperator(matrix(kind, model), comm, name=kind)
