"""The two built-in models, softmax regression and the MNIST CNN, as Keras models.

Their θ (the trainable variables in order, each in C order) is the canonical parameter
vector: a conv kernel (kh, kw, in, out) then its bias, a dense kernel (in, out) then its
bias; the softmax model is one (pixels, 10) kernel, entry pixel·10 + class. `layout`
gives names and shapes without TensorFlow, so flags can be checked before it starts.
The models are configurable (image size, widths) only so that the tests can build tiny
versions whose dense Hessian fits in memory; `build("softmax")` and `build("cnn")` are
exactly the models of the design.

Both take (n, s, s, 1) images with pixels in [0, 1], output logits, and are compiled
with the mean softmax cross-entropy from logits.
"""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..errors import HessmpiError

MODELS = ("softmax", "cnn")
N_CLASSES = 10
LEAK = 0.01


def _cnn_flat_side(image_size: int, kernel: int) -> int:
    side = image_size
    for _ in range(2):
        side = (side - kernel + 1) // 2
    return side // 2


def layout(name: str, image_size: int = 28, filters=(32, 64), kernel: int = 5, hidden: int = 128):
    """The Layout of built-in model `name` (no TensorFlow needed)."""
    from .keras_model import Layout

    if name == "softmax":
        return Layout(["W/kernel"], [(image_size * image_size, N_CLASSES)], name)
    if name == "cnn":
        side = _cnn_flat_side(image_size, kernel)
        if side < 1:
            raise HessmpiError(f"cnn: image size {image_size} is too small for kernel {kernel}")
        f1, f2 = filters
        return Layout(["conv1/kernel", "conv1/bias", "conv2/kernel", "conv2/bias",
                       "dense1/kernel", "dense1/bias", "dense2/kernel", "dense2/bias"],
                      [(kernel, kernel, 1, f1), (f1,), (kernel, kernel, f1, f2), (f2,),
                       (side * side * f2, hidden), (hidden,), (hidden, N_CLASSES), (N_CLASSES,)], name)
    raise HessmpiError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}, a saved Keras model "
                       f"(FILE.keras) or module:function")


def init(name: str, seed: int = 0, **config) -> np.ndarray:
    """The deterministic initial θ (float64): zero for softmax; for the CNN Glorot-uniform
    kernels (Keras' fan definitions) drawn from numpy's generator of `seed`, zero biases."""
    lay = layout(name, **config)
    theta = np.zeros(lay.n_params)
    if name == "softmax":
        return theta
    rng = np.random.default_rng(seed)
    for t in lay:
        if t.name.endswith("kernel"):
            receptive = int(np.prod(t.shape[:-2])) if len(t.shape) > 2 else 1
            fan_in, fan_out = t.shape[-2] * receptive, t.shape[-1] * receptive
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            theta[t.offset:t.offset + t.size] = rng.uniform(-limit, limit, t.size)
    return theta


def keras_model(name: str, dtype: str = "float64", image_size: int = 28, filters=(32, 64), kernel: int = 5,
                hidden: int = 128):
    """The built-in model as a compiled Keras model (weights not yet set)."""
    keras = runtime.import_keras()

    from . import layers

    layout(name, image_size, filters, kernel, hidden)  # checks the name and sizes
    inputs = keras.Input((image_size, image_size, 1), dtype=dtype)
    if name == "softmax":
        stack = [keras.layers.Flatten(dtype=dtype),
                 keras.layers.Dense(N_CLASSES, use_bias=False, name="W", dtype=dtype)]
    else:
        def leaky():
            return keras.layers.LeakyReLU(negative_slope=LEAK, dtype=dtype)

        stack = [layers.Conv2D(filters[0], kernel, name="conv1", dtype=dtype), layers.MaxPooling2D(2, dtype=dtype),
                 leaky(), layers.Conv2D(filters[1], kernel, name="conv2", dtype=dtype),
                 layers.MaxPooling2D(2, dtype=dtype), leaky(), layers.MaxPooling2D(2, dtype=dtype),
                 keras.layers.Flatten(dtype=dtype), keras.layers.Dense(hidden, name="dense1", dtype=dtype), leaky(),
                 keras.layers.Dense(N_CLASSES, name="dense2", dtype=dtype), leaky()]
    model = keras.Sequential([inputs, *stack], name=name)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def build(name: str, dtype: str = "float64", seed: int = 0, **config):
    """Built-in model `name` as a FlatModel computing in dtype, its θ set to init(name, seed)."""
    from .keras_model import FlatModel

    flat = FlatModel(keras_model(name, dtype, **config), dtype, name=name)
    flat.set_params(init(name, seed, **config))
    flat.kind, flat.config = name, dict(config)
    return flat
