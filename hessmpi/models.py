"""The two models of the mission as pure functions of one flat parameter vector θ.

θ is the concatenation of the trainable tensors in layer order, each flattened in
C order, in Keras layouts: a conv kernel is (kh, kw, in, out) followed by its
bias, a dense kernel is (in, out) followed by its bias. `Model.layout` lists the
tensors with their offsets so that other tools can read stored vectors.

The models are configurable (image size, widths) only so that the tests can build
tiny versions whose dense Hessian fits in memory; `get_model("softmax")` and
`get_model("cnn")` are exactly the models of DESIGN.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import HessmpiError

MODELS = ("softmax", "cnn")
N_CLASSES = 10
LEAK = 0.01


@dataclass(frozen=True)
class Tensor:
    """One trainable tensor inside θ: its name, Keras shape and offset."""

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
    """A classifier whose logits are a TensorFlow function of (θ, images)."""

    name: str
    layout: tuple
    image_size: int

    @property
    def n_params(self) -> int:
        last = self.layout[-1]
        return last.offset + last.size

    def unflatten(self, theta):
        """The tensors of θ (a 1-D tf tensor) reshaped to their Keras layouts."""
        import tensorflow as tf

        return [tf.reshape(theta[t.offset:t.offset + t.size], t.shape) for t in self.layout]

    def init(self, seed: int = 0) -> np.ndarray:
        """The deterministic initial θ (float64) for this seed."""
        raise NotImplementedError

    def logits(self, theta, images):
        """Logits (n, 10) for images (n, s, s, 1) at the flat parameters theta."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}: {self.n_params:,} parameters"


class Softmax(Model):
    """Softmax regression: logits = X·W with W of shape (pixels, 10), no bias."""

    def __init__(self, image_size: int = 28):
        self.name = "softmax"
        self.image_size = image_size
        self.layout = _layout([("W", (image_size * image_size, N_CLASSES))])

    def init(self, seed: int = 0) -> np.ndarray:
        return np.zeros(self.n_params)

    def logits(self, theta, images):
        import tensorflow as tf

        (w,) = self.unflatten(theta)
        return tf.matmul(tf.reshape(images, (-1, w.shape[0])), w)


class CNN(Model):
    """Conv(f1,k)→MaxPool2→LeakyReLU→Conv(f2,k)→MaxPool2→LeakyReLU→MaxPool2→Flatten
    →Dense(hidden, leaky)→Dense(10, leaky) as logits; all convolutions 'valid'."""

    def __init__(self, image_size: int = 28, filters=(32, 64), kernel: int = 5, hidden: int = 128):
        self.name = "cnn"
        self.image_size = image_size
        f1, f2 = filters
        side = image_size
        for _ in range(2):
            side = (side - kernel + 1) // 2
        side //= 2
        if side < 1:
            raise HessmpiError(f"cnn: image size {image_size} is too small for kernel {kernel}")
        flat = side * side * f2
        self.layout = _layout([
            ("conv1/kernel", (kernel, kernel, 1, f1)), ("conv1/bias", (f1,)),
            ("conv2/kernel", (kernel, kernel, f1, f2)), ("conv2/bias", (f2,)),
            ("dense1/kernel", (flat, hidden)), ("dense1/bias", (hidden,)),
            ("dense2/kernel", (hidden, N_CLASSES)), ("dense2/bias", (N_CLASSES,)),
        ])

    def init(self, seed: int = 0) -> np.ndarray:
        """Glorot-uniform kernels (Keras' fan definitions) from the seed; zero biases."""
        rng = np.random.default_rng(seed)
        theta = np.zeros(self.n_params)
        for t in self.layout:
            if t.name.endswith("kernel"):
                receptive = int(np.prod(t.shape[:-2])) if len(t.shape) > 2 else 1
                fan_in, fan_out = t.shape[-2] * receptive, t.shape[-1] * receptive
                limit = np.sqrt(6.0 / (fan_in + fan_out))
                theta[t.offset:t.offset + t.size] = rng.uniform(-limit, limit, t.size)
        return theta

    def logits(self, theta, images):
        import tensorflow as tf

        k1, b1, k2, b2, w3, b3, w4, b4 = self.unflatten(theta)
        h = tf.nn.leaky_relu(_max_pool(_add_bias(tf.nn.conv2d(images, k1, 1, "VALID"), b1)), LEAK)
        h = tf.nn.leaky_relu(_max_pool(_add_bias(tf.nn.conv2d(h, k2, 1, "VALID"), b2)), LEAK)
        h = tf.reshape(_max_pool(h), (tf.shape(h)[0], w3.shape[0]))
        h = tf.nn.leaky_relu(tf.matmul(h, w3) + b3, LEAK)
        return tf.nn.leaky_relu(tf.matmul(h, w4) + b4, LEAK)


# The CNN's bias additions and max-pools, with TensorFlow's values and first derivatives but
# second derivatives that are cheaper in a reverse-over-reverse HVP (bench/hvp_cost.py: with
# curvature's output_gradients, a float32 HVP about 20% faster; gradients unchanged).

_POOL = dict(ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1], padding="VALID")


def _max_pool(h):
    """tf.nn.max_pool2d(h, 2, 2, "VALID") with the same gradient: MaxPoolGrad, which routes each
    window's gradient to one element (on a tie, the one TensorFlow picks). That gradient is
    linear in the incoming gradient and piecewise constant in h, so its own gradient takes each
    window's element of TensorFlow's choice, read off MaxPoolGrad of ones: cheaper than
    MaxPoolGradGrad, which finds the maxima again, and than TensorFlow's gradient of
    MaxPoolGrad, which also adds zero tensors of h's size."""
    import tensorflow as tf

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
    """z + b (b along the last axis), differentiated like it. The gradient's gradient
    broadcasts to z's shape, where TensorFlow's reads the shape of the incoming gradient and
    so keeps all of that gradient's computation (a convolution) alive in an HVP that needs
    none of its values."""
    import tensorflow as tf

    @tf.custom_gradient
    def add(z, b):
        out = z + b
        shape = tf.shape(out)  # of the output, not of z: a second use of z blocks conv+bias fusion

        @tf.custom_gradient
        def bias_grad(dz):
            return tf.reduce_sum(dz, axis=tf.range(tf.rank(dz) - 1)), lambda g: tf.broadcast_to(g, shape)

        return out, lambda dz: (dz, bias_grad(dz))

    return add(z, b)


def get_model(name: str, **config) -> Model:
    """The model called name ('softmax' or 'cnn'); config only for tiny test variants."""
    if name == "softmax":
        return Softmax(**config)
    if name == "cnn":
        return CNN(**config)
    raise HessmpiError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
