"""The curvature operators of the public API: `Hessian` and `GGN` of any Keras model, loss and data.

    H = hessmpi.Hessian(model, (x, y))              # the compiled loss, or loss=...
    G = hessmpi.GGN(H)                               # the same problem's Gauss-Newton matrix
    top = hessmpi.eigenpairs(H, k=10)

The same code runs in one plain process and under `mpirun -n P`: every rank passes the
same model and data and keeps only its contiguous block of the samples; every function
of the API is collective.
"""

from __future__ import annotations

from .curvature.operator import LinearOperator
from .curvature.problem import Problem


def load_dataset(name: str, split: str = "train", n_samples: int | None = None, data_dir: str | None = None,
                 seed: int = 0):
    """One of hessmpi's datasets ('mnist-5k', 'mnist', 'fashion-mnist', 'synthetic') as data.Data:
    28×28 images that a model sees scaled to [0, 1], and their labels."""
    from .data import datasets

    return datasets.load(name, data_dir, seed).split(split, n_samples)


def problem(model, data=None, loss=None, *, dtype: str | None = None, n_samples: int | None = None,
            params=None, comm=None, micro_batch: int = 1000, hvp_mode: str = "reverse-over-reverse",
            from_logits: bool | None = None, seed: int = 0, data_dir: str | None = None) -> Problem:
    """The Problem (model, loss, samples over the ranks, θ) of the arguments of `Hessian`."""
    from .data.samples import as_samples, load_npz
    from .errors import HessmpiError
    from .models import FlatModel, load_model, resolve

    reused = model if isinstance(model, Problem) else getattr(model, "problem", None)
    if reused is not None:
        given = [name for name, value in (("data", data), ("loss", loss), ("dtype", dtype), ("n_samples", n_samples),
                                          ("params", params), ("comm", comm), ("from_logits", from_logits))
                 if value is not None]
        if given:
            raise HessmpiError(f"{', '.join(given)} cannot change a problem that exists: pass the model and data "
                               f"again to build another")
        return reused
    if data is None:
        raise TypeError("data is required: an (x, y) pair of arrays, hessmpi.Data or a tf.data.Dataset")
    if isinstance(model, str):
        flat = load_model(model, dtype, seed)
    elif isinstance(model, FlatModel):
        flat = model if dtype in (None, model.dtype) else FlatModel.of(model.source, dtype, model.name, like=model)
    else:
        flat = FlatModel.of(model, dtype)
    if isinstance(data, str):  # an .npz file (Keras' mnist.npz keys) or one of hessmpi's datasets
        samples = (as_samples(load_npz(data), n_samples) if data.endswith(".npz")
                   else load_dataset(data, n_samples=n_samples, data_dir=data_dir, seed=seed))
    else:
        samples = as_samples(data, n_samples, _sample_rank(flat.keras))
    return Problem(flat, resolve(loss, flat.source, from_logits), samples, comm, micro_batch, hvp_mode, params)


def _sample_rank(model) -> int | None:
    """How many axes one sample of the Keras model's first input has (tf.nest order of its
    inputs, as a dataset's x is flattened), or None if the model does not say: a batched
    tf.data.Dataset is recognised by one axis more."""
    from . import runtime

    tf = runtime.import_tensorflow()
    for attribute in ("input", "inputs"):  # functional (its input structure); Sequential
        try:
            leaves = tf.nest.flatten(getattr(model, attribute))
        except (AttributeError, ValueError):  # a subclassed model has neither
            continue
        if leaves and getattr(leaves[0], "shape", None) is not None:
            return len(leaves[0].shape) - 1
    shapes = getattr(model, "_build_shapes_dict", None) or {}  # a subclassed model built by a call
    if len(shapes) == 1:
        shape = next(iter(shapes.values()))
        if isinstance(shape, (tuple, list)) and all(d is None or isinstance(d, int) for d in shape):
            return len(shape) - 1
    return None


def Hessian(model, data=None, loss=None, *, layer: str | None = None, **options) -> LinearOperator:
    """The Hessian of the mean loss (plus the model's own regularization terms) over the data,
    at the model's weights, as a distributed operator.

    model: a built Keras model (Sequential, functional or subclassed), a saved model's path
    (FILE.keras), 'module:function', or 'softmax' / 'cnn' (the built-in models); or a
    Hessian/GGN or Problem, whose problem is reused. data: an (x, y) pair of arrays (x a
    tuple or dict of arrays for several inputs), hessmpi.Data, a tf.data.Dataset of (x, y)
    samples, or the name of one of hessmpi's datasets. loss: None (the model's compiled
    loss), a Keras loss name or object, or a per-sample function f(y_true, y_pred).
    layer: the diagonal block of one layer ('conv1') or tensor ('conv1/kernel').
    options: dtype ('float64', 'float32'; default the model's own, float64 for the built-in
    models), n_samples (the first N samples), params (θ instead of the model's weights),
    comm, micro_batch, hvp_mode, from_logits, seed (a built-in model's initialisation and
    the synthetic dataset's), data_dir (a dataset's files). data may also be the path of
    an .npz file with Keras' keys (x_train, y_train).

    The loss is taken in inference mode (BatchNormalization on its moving statistics,
    Dropout off), so it is a mean of per-sample terms and the numbers do not depend on the
    number of ranks. `H @ v`, `H.to_petsc()`, `H.to_scipy()`, `H + gamma * R`.
    """
    return problem(model, data, loss, **options).operator_for("hessian", layer)


def regularizer(kind: str, like: LinearOperator) -> LinearOperator:
    """The regularizer R of `kind` ('l2': the identity; 'laplacian': the Laplacian of softmax
    regression's weight images) for the model of `like` (a Hessian or GGN), laid out like it:
    `H + gamma * hessmpi.regularizer("laplacian", H)`."""
    from .curvature import regularizers
    from .errors import HessmpiError

    if like.problem is None or like.n != like.problem.n_params:
        raise HessmpiError("a regularizer acts on all the parameters: like must be a Hessian or GGN of a problem, "
                           "not a layer's block or another operator")
    return regularizers.operator(kind, like.problem.model, like.comm)


def GGN(model, data=None, loss=None, *, layer: str | None = None, **options) -> LinearOperator:
    """The generalized Gauss-Newton matrix Σᵢ Jᵢᵀ ∇²ℓᵢ Jᵢ / N of the same arguments as `Hessian`
    (Jᵢ: the Jacobian of the model's outputs for sample i); positive semi-definite for a loss
    convex in the outputs."""
    return problem(model, data, loss, **options).operator_for("ggn", layer)
