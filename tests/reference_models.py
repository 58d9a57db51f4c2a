"""The built-in models written out again as plain TensorFlow functions of a flat θ (tf.nn ops,
TensorFlow's own max-pool and bias addition): the independent references that hessmpi's
Keras models, their dense Hessians and their derivatives are checked against."""

from __future__ import annotations

import numpy as np

LEAK = 0.01


def _split(theta, layout):
    import tensorflow as tf

    return [tf.reshape(theta[t.offset:t.offset + t.size], t.shape) for t in layout]


def logits(name: str, config: dict, theta, images):
    """Logits (n, 10) of built-in model `name` (with its test config) at the flat θ, for images
    (n, s, s, 1) in [0, 1]."""
    import tensorflow as tf

    from hessmpi.models import builtin

    layout = builtin.layout(name, **config)
    if name == "softmax":
        (w,) = _split(theta, layout)
        return tf.matmul(tf.reshape(images, (-1, w.shape[0])), w)
    k1, b1, k2, b2, w3, b3, w4, b4 = _split(theta, layout)

    def pool(h):
        return tf.nn.max_pool2d(h, 2, 2, "VALID")

    h = tf.nn.leaky_relu(pool(tf.nn.conv2d(images, k1, 1, "VALID") + b1), LEAK)
    h = tf.nn.leaky_relu(pool(tf.nn.conv2d(h, k2, 1, "VALID") + b2), LEAK)
    h = tf.reshape(pool(h), (tf.shape(h)[0], w3.shape[0]))
    h = tf.nn.leaky_relu(tf.matmul(h, w3) + b3, LEAK)
    return tf.nn.leaky_relu(tf.matmul(h, w4) + b4, LEAK)


def loss_sum(name: str, config: dict, theta, images, labels):
    """Σ of the softmax cross-entropy of the reference model over the samples."""
    import tensorflow as tf

    return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits(name, config, theta, images)))


def pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images (n, s, s) → float64 (n, s, s, 1) in [0, 1]."""
    return (np.asarray(images, dtype=np.float64) / 255)[..., np.newaxis]
