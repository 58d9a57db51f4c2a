"""The loss of an analysis as a per-sample function ℓ(y_true, y_pred), computed in the analysis dtype.

`resolve` accepts the model's compiled loss (loss=None), a Keras loss by name
('sparse_categorical_crossentropy', 'mse', 'huber', …) or as an object
(keras.losses.Huber(delta=0.5)), or any callable f(y_true, y_pred) returning one value
per sample (or per element: the values of a sample are averaged). The objective is the
mean of ℓ over the samples, as Keras' default reduction ("sum_over_batch_size") gives;
a loss object's own `reduction` and sample weights are not used. Keras loss objects
compute in floatx when called, so their unreduced `call` (or their function and its
settings) is used instead, in the dtype of the model's outputs.

A loss restored with a saved model is what Keras restored: Huber's delta, for one, is not
saved by Keras 3 and comes back as 1.0.
"""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..errors import DataError, HessmpiError

# What the targets must look like, by the Keras function a loss calls.
SPARSE, CATEGORICAL, BINARY, OTHER = "sparse", "categorical", "binary", "other"
_KINDS = {"sparse_categorical_crossentropy": SPARSE, "categorical_crossentropy": CATEGORICAL,
          "binary_crossentropy": BINARY}


class Loss:
    """ℓ(y_true, y_pred) per sample; `kind` says what the targets are (class indices, one-hot
    rows, 0/1 values, or anything) for the checks and the accuracy."""

    def __init__(self, fn, name: str, kind: str = OTHER, **kwargs):
        self.fn, self.name, self.kind, self.kwargs = fn, name, kind, kwargs

    def __repr__(self):
        settings = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"Loss({self.name}{', ' + settings if settings else ''})"

    @property
    def key(self) -> tuple:
        """What identifies the loss's TensorFlow code: equal keys trace the same functions."""
        return (self.fn, self.kind, tuple(sorted(self.kwargs.items())))

    def per_sample(self, y_true, y_pred):
        """One value per sample (a tf tensor (n,)): the loss's values averaged over all but
        the first axis."""
        tf = runtime.import_tensorflow()

        values = self.fn(y_true, y_pred, **self.kwargs)
        rank = values.shape.rank
        return values if rank == 1 else tf.reduce_mean(values, axis=list(range(1, rank)))

    def n_correct(self, y_true, y_pred):
        """How many samples the outputs classify correctly (a tf int64 scalar), or None if the
        loss is not a classification loss."""
        tf = runtime.import_tensorflow()

        if self.kind == SPARSE:
            predicted = tf.argmax(y_pred, axis=-1)
            hits = tf.equal(predicted, tf.reshape(tf.cast(y_true, tf.int64), tf.shape(predicted)))
        elif self.kind == CATEGORICAL:
            hits = tf.equal(tf.argmax(y_pred, axis=-1), tf.argmax(y_true, axis=-1))
        elif self.kind == BINARY:
            threshold = 0.0 if self.kwargs.get("from_logits") else 0.5
            predicted = tf.cast(y_pred > tf.cast(threshold, y_pred.dtype), tf.int64)
            hits = tf.equal(predicted, tf.cast(tf.round(tf.cast(y_true, y_pred.dtype)), tf.int64))
        else:
            return None
        if hits.shape.rank > 1:  # every position of a sample right
            hits = tf.reduce_all(hits, axis=list(range(1, hits.shape.rank)))
        return tf.reduce_sum(tf.cast(hits, tf.int64))

    def check_targets(self, y: np.ndarray, output_shape: tuple, where: str = "y") -> None:
        """DataError if targets y (numpy, one row per sample) cannot go with outputs of
        output_shape (the model's per-sample output shape)."""
        y = np.asarray(y)
        if self.kind == SPARSE:
            classes = output_shape[-1] if output_shape else 1
            if y.dtype.kind == "f" and np.any(y != np.round(y)):
                raise DataError(f"{where}: {self.name} needs integer class labels, got fractional values")
            if y.size and (y.min() < 0 or y.max() >= classes):
                raise DataError(f"{where}: labels must be in 0..{classes - 1} for the model's {classes} outputs, "
                                f"found {y.min():g}..{y.max():g}")
        elif self.kind in (CATEGORICAL, BINARY) and tuple(y.shape[1:]) != tuple(output_shape):
            raise DataError(f"{where}: {self.name} needs targets of the outputs' shape {tuple(output_shape)} per "
                            f"sample, got {tuple(y.shape[1:])}")
        if self.kind == BINARY and y.size and (y.min() < 0 or y.max() > 1):
            raise DataError(f"{where}: {self.name} needs targets in [0, 1], found {y.min():g}..{y.max():g}")


def _from_keras_function(fn, name: str, kwargs: dict) -> Loss:
    return Loss(fn, name, _KINDS.get(getattr(fn, "__name__", ""), OTHER), **kwargs)


def resolve(loss=None, model=None, from_logits: bool | None = None) -> Loss:
    """The Loss of an analysis: `loss` (a name, a Keras loss object or a per-sample callable),
    or the Keras model's compiled loss when loss is None. from_logits, when given, sets the
    from_logits of a cross-entropy. HessmpiError if there is none or the name is unknown."""
    keras = runtime.import_keras()
    from keras.src.losses.losses import LossFunctionWrapper  # not exported by Keras 3

    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise HessmpiError("the model was not compiled with a loss: pass one (loss='sparse_categorical_crossentropy', "
                               "'mse', a keras.losses object or a function; --loss NAME on the command line)")
    if isinstance(loss, Loss):
        result = loss
    elif isinstance(loss, str):
        try:
            found = keras.losses.get(loss)
        except ValueError:
            found = None
        if found is None:
            raise HessmpiError(f"unknown loss {loss!r}: give a Keras loss name such as sparse_categorical_crossentropy, "
                               f"categorical_crossentropy, binary_crossentropy, mean_squared_error (mse), huber")
        return resolve(found, model, from_logits)
    elif isinstance(loss, keras.losses.Loss):
        fn = getattr(loss, "fn", None)
        if fn is not None and type(loss).call is LossFunctionWrapper.call:
            result = _from_keras_function(fn, type(loss).__name__, dict(loss._fn_kwargs))
        else:  # a subclass with its own call: unreduced, in the dtype of its inputs
            result = Loss(loss.call, type(loss).__name__)
    elif callable(loss):
        result = _from_keras_function(loss, getattr(loss, "__name__", type(loss).__name__), {})
    else:
        raise HessmpiError(f"loss must be a name, a keras.losses.Loss or a function, got {type(loss).__name__}")
    if from_logits is not None:
        if result.kind == OTHER:
            raise HessmpiError(f"from_logits applies to a cross-entropy, not to {result.name}")
        result = Loss(result.fn, result.name, result.kind, **{**result.kwargs, "from_logits": from_logits})
    return result
