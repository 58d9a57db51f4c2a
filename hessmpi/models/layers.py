"""Keras layers of the built-in CNN whose second derivatives are cheaper in a
reverse-over-reverse Hessian-vector product, with the values and first derivatives of
Keras' own (registered, so a saved built-in model loads back where hessmpi is imported).

Measured on the CNN (1,000 digits, float32, 2 threads, `bench/hvp_cost.py
--compare-handwritten`): the HVP of the Keras model with these layers costs 0.998× that
of the former hand-written model; with Keras' own Conv2D and MaxPooling2D 1.38×.
"""

from __future__ import annotations

from .. import runtime

tf = runtime.import_tensorflow()
keras = runtime.import_keras()

_POOL = dict(ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1], padding="VALID")


def max_pool(h):
    """tf.nn.max_pool2d(h, 2, 2, "VALID") with the same gradient: MaxPoolGrad, which routes each
    window's gradient to one element (on a tie, the one TensorFlow picks). That gradient is
    linear in the incoming gradient and piecewise constant in h, so its own gradient takes each
    window's element of TensorFlow's choice, read off MaxPoolGrad of ones: cheaper than
    MaxPoolGradGrad, which finds the maxima again, and than TensorFlow's gradient of
    MaxPoolGrad, which also adds zero tensors of h's size."""

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


def add_bias(z, b):
    """z + b (b along the last axis), differentiated like it. The gradient's gradient
    broadcasts to z's shape, where TensorFlow's reads the shape of the incoming gradient and
    so keeps all of that gradient's computation (a convolution) alive in an HVP that needs
    none of its values."""

    @tf.custom_gradient
    def add(z, b):
        out = z + b
        shape = tf.shape(out)  # of the output, not of z: a second use of z blocks conv+bias fusion

        @tf.custom_gradient
        def bias_grad(dz):
            return tf.reduce_sum(dz, axis=tf.range(tf.rank(dz) - 1)), lambda g: tf.broadcast_to(g, shape)

        return out, lambda dz: (dz, bias_grad(dz))

    return add(z, b)


@keras.saving.register_keras_serializable(package="hessmpi")
class MaxPooling2D(keras.layers.MaxPooling2D):
    """keras.layers.MaxPooling2D; 2×2 windows with stride 2 and 'valid' padding use max_pool."""

    def call(self, inputs):
        if (tuple(self.pool_size), tuple(self.strides), self.padding, self.data_format) == \
                ((2, 2), (2, 2), "valid", "channels_last"):
            return max_pool(inputs)
        return super().call(inputs)


@keras.saving.register_keras_serializable(package="hessmpi")
class Conv2D(keras.layers.Conv2D):
    """keras.layers.Conv2D; with a bias, no activation, stride 1, no dilation, one group and
    'valid' padding (channels last) it adds the bias with add_bias."""

    def call(self, inputs):
        plain = (self.use_bias and self.activation is keras.activations.linear and tuple(self.strides) == (1, 1)
                 and tuple(self.dilation_rate) == (1, 1) and self.groups == 1 and self.padding == "valid"
                 and self.data_format == "channels_last")
        if not plain:
            return super().call(inputs)
        return add_bias(tf.nn.conv2d(inputs, self.kernel, 1, "VALID"), self.bias)
