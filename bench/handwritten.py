"""REFERENCE OF A COMPARISON, NOT LIBRARY CODE: the former hand-written softmax and CNN and their
loss/gradient and Hessian-vector product, frozen for `bench/hvp_cost.py --compare-handwritten`.

hessmpi's built-in models are now Keras models on the generic path
(hessmpi.models.builtin, hessmpi.curvature.LocalCurvature). The project keeps that path
only if its HVP is within 5% of the hand-written one it replaced; this module is that
hand-written one, copied from commit 6659808 (the last before the reorganisation):

- `Softmax.logits`, `CNN.logits`, `_max_pool`, `_add_bias` and the θ layouts from
  `git show 6659808:hessmpi/models.py`;
- the traced `loss_grad` and `hvp` (both HVP modes) of `_functions` for uint8 pixels
  (raw=True) from `git show 6659808:hessmpi/curvature.py`, and the loops of its
  LocalCurvature that sum them over the micro-batches.

Only what the comparison needs is kept (no GGN, accuracy, float inputs or test-size
variants). Do not edit the numerics: the point is a fixed reference. The wrapper
`Curvature` takes the generic LocalCurvature's own micro-batches (`data.LocalShard`:
(n, 28, 28, 1) uint8 pixels, int64 labels), so both sides see the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hessmpi import runtime

N_CLASSES = 10
LEAK = 0.01
IMAGE_SIZE = 28
_POOL = dict(ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1], padding="VALID")


# ---------------------------------------------------------------- models (6659808:hessmpi/models.py)

@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def _layout(shapes):
    tensors, offset = [], 0
    for name, shape in shapes:
        tensors.append(Tensor(name, tuple(shape), offset))
        offset += int(np.prod(shape))
    return tuple(tensors)


class Model:
    name: str
    layout: tuple
    image_size: int = IMAGE_SIZE

    @property
    def n_params(self) -> int:
        last = self.layout[-1]
        return last.offset + last.size

    def unflatten(self, theta):
        tf = runtime.import_tensorflow()
        return [tf.reshape(theta[t.offset:t.offset + t.size], t.shape) for t in self.layout]


class Softmax(Model):
    """Softmax regression: logits = X·W with W of shape (pixels, 10), no bias."""

    def __init__(self):
        self.name = "softmax"
        self.layout = _layout([("W", (IMAGE_SIZE * IMAGE_SIZE, N_CLASSES))])

    def logits(self, theta, images):
        tf = runtime.import_tensorflow()
        (w,) = self.unflatten(theta)
        return tf.matmul(tf.reshape(images, (-1, w.shape[0])), w)


class CNN(Model):
    """Conv(32,5)→MaxPool2→LeakyReLU→Conv(64,5)→MaxPool2→LeakyReLU→MaxPool2→Flatten
    →Dense(128, leaky)→Dense(10, leaky) as logits; all convolutions 'valid'."""

    def __init__(self, filters=(32, 64), kernel: int = 5, hidden: int = 128):
        self.name = "cnn"
        f1, f2 = filters
        side = IMAGE_SIZE
        for _ in range(2):
            side = (side - kernel + 1) // 2
        side //= 2
        flat = side * side * f2
        self.layout = _layout([
            ("conv1/kernel", (kernel, kernel, 1, f1)), ("conv1/bias", (f1,)),
            ("conv2/kernel", (kernel, kernel, f1, f2)), ("conv2/bias", (f2,)),
            ("dense1/kernel", (flat, hidden)), ("dense1/bias", (hidden,)),
            ("dense2/kernel", (hidden, N_CLASSES)), ("dense2/bias", (N_CLASSES,)),
        ])

    def logits(self, theta, images):
        tf = runtime.import_tensorflow()
        k1, b1, k2, b2, w3, b3, w4, b4 = self.unflatten(theta)
        h = tf.nn.leaky_relu(_max_pool(_add_bias(tf.nn.conv2d(images, k1, 1, "VALID"), b1)), LEAK)
        h = tf.nn.leaky_relu(_max_pool(_add_bias(tf.nn.conv2d(h, k2, 1, "VALID"), b2)), LEAK)
        h = tf.reshape(_max_pool(h), (tf.shape(h)[0], w3.shape[0]))
        h = tf.nn.leaky_relu(tf.matmul(h, w3) + b3, LEAK)
        return tf.nn.leaky_relu(tf.matmul(h, w4) + b4, LEAK)


def _max_pool(h):
    """tf.nn.max_pool2d(h, 2, 2, "VALID") with the same gradient; its second derivative read
    off MaxPoolGrad of ones (see 6659808:hessmpi/models.py)."""
    tf = runtime.import_tensorflow()

    @tf.custom_gradient
    def pool(h):
        y = tf.nn.max_pool2d(h, 2, 2, "VALID")

        def pool_grad_grad(g):
            chosen = tf.raw_ops.MaxPoolGrad(orig_input=h, orig_output=y, grad=tf.ones_like(y), **_POOL)
            return tf.nn.avg_pool2d(chosen * g, 2, 2, "VALID") * 4  # one nonzero term: exact

        @tf.custom_gradient
        def pool_grad(dy):
            return tf.raw_ops.MaxPoolGrad(orig_input=h, orig_output=y, grad=dy, **_POOL), pool_grad_grad

        return y, pool_grad

    return pool(h)


def _add_bias(z, b):
    """z + b (b along the last axis), its gradient's gradient broadcast to the output's shape
    (see 6659808:hessmpi/models.py)."""
    tf = runtime.import_tensorflow()

    @tf.custom_gradient
    def add(z, b):
        out = z + b
        shape = tf.shape(out)  # of the output, not of z: a second use of z blocks conv+bias fusion

        @tf.custom_gradient
        def bias_grad(dz):
            return tf.reduce_sum(dz, axis=tf.range(tf.rank(dz) - 1)), lambda g: tf.broadcast_to(g, shape)

        return out, lambda dz: (dz, bias_grad(dz))

    return add(z, b)


def get_model(name: str) -> Model:
    return {"softmax": Softmax, "cnn": CNN}[name]()


# ---------------------------------------------------------------- traced functions (6659808:hessmpi/curvature.py)

def functions(model: Model, dtype, hvp_mode: str = "reverse-over-reverse") -> tuple:
    """(loss_grad, hvp) of `model` in `dtype` for uint8 pixels, traced once per model, dtype
    and mode (kept on the model, as the former `_functions` did)."""
    tf = runtime.import_tensorflow()
    dtype = tf.as_dtype(dtype)
    cache = model.__dict__.setdefault("_tf_functions", {})
    key = (dtype.name, hvp_mode)
    if key in cache:
        return cache[key]
    s = model.image_size
    vec = tf.TensorSpec((model.n_params,), dtype)
    batch = (tf.TensorSpec((None, s, s, 1), tf.uint8), tf.TensorSpec((None,), tf.int64))
    pixel_values = tf.constant((np.arange(256) / 255).astype(dtype.as_numpy_dtype))

    def images(x):
        return tf.gather(pixel_values, tf.cast(x, tf.int32))

    def loss_sum(theta, x, y):
        logits = model.logits(theta, images(x))
        return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))

    def loss_grad(theta, x, y):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = loss_sum(theta, x, y)
        return loss, tape.gradient(loss, theta)

    def hvp_rr(theta, v, x, y):
        with tf.GradientTape() as outer:
            outer.watch(theta)
            with tf.GradientTape() as inner:
                inner.watch(theta)
                loss = loss_sum(theta, x, y)
            g = inner.gradient(loss, theta)
        return outer.gradient(g, theta, output_gradients=v)

    def hvp_fr(theta, v, x, y):
        with tf.autodiff.ForwardAccumulator(theta, v) as acc:
            with tf.GradientTape() as tape:
                tape.watch(theta)
                loss = loss_sum(theta, x, y)
            g = tape.gradient(loss, theta)
        return acc.jvp(g)

    hvp = hvp_rr if hvp_mode == "reverse-over-reverse" else hvp_fr
    cache[key] = (tf.function(loss_grad, input_signature=(vec, *batch)),
                  tf.function(hvp, input_signature=(vec, vec, *batch)))
    return cache[key]


class Curvature:
    """Σ loss, Σ gradient and Σ HVP over the micro-batches of `shard` (a hessmpi.data.LocalShard
    of uint8 pixels: the generic LocalCurvature's own), by the hand-written functions; the
    loops of the former LocalCurvature.loss_grad/_product, over the micro-batches made
    tensors once, as the former LocalCurvature held them."""

    def __init__(self, model: Model, dtype: str, shard, hvp_mode: str = "reverse-over-reverse"):
        if not shard.pixels:
            raise ValueError("the hand-written reference takes uint8 pixels only")
        self.model, self.batches = model, list(shard.batches())
        self.dtype = runtime.import_tensorflow().as_dtype(dtype)
        self.n_params = model.n_params
        self._fns = functions(model, self.dtype, hvp_mode)
        self.theta = None

    def set_params(self, theta: np.ndarray) -> None:
        tf = runtime.import_tensorflow()
        self.theta = tf.constant(np.asarray(theta, dtype=np.float64), self.dtype)

    def loss_grad(self) -> tuple[float, np.ndarray]:
        loss, grad = 0.0, np.zeros(self.n_params)
        for x, y in self.batches:
            value, g = self._fns[0](self.theta, x, y)
            loss += float(value)
            grad += g.numpy()
        return loss, grad

    def hvp(self, v: np.ndarray) -> np.ndarray:
        tf = runtime.import_tensorflow()
        out = np.zeros(self.n_params)
        tv = tf.constant(v, self.dtype)
        for x, y in self.batches:
            out += self._fns[1](self.theta, tv, x, y).numpy()
        return out

    def tracing_count(self) -> int:
        return self._fns[1].experimental_get_tracing_count()
