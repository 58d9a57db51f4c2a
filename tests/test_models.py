"""Tests of hessmpi.models: exact sizes, the canonical order of θ, logits, init.

Nothing here communicates: every rank runs the same small checks on its own.
"""

import numpy as np
import pytest

from hessmpi import runtime

runtime.configure_threads(1)
tf = runtime.import_tensorflow()

from hessmpi import models  # noqa: E402
from hessmpi.errors import HessmpiError  # noqa: E402

import cases  # noqa: E402


@pytest.mark.parametrize("spec", cases.FULL_MODELS + [cases.SOFTMAX_TINY, cases.CNN_TINY],
                         ids=lambda s: f"{s['name']}-{s['n_params']}")
def test_parameter_count(spec):
    model = cases.build_model(spec)
    assert model.n_params == spec["n_params"]
    assert model.init(0).shape == (spec["n_params"],)


def test_cnn_layout_is_keras_order():
    model = models.get_model("cnn")
    expected = [
        ("conv1/kernel", (5, 5, 1, 32)), ("conv1/bias", (32,)),
        ("conv2/kernel", (5, 5, 32, 64)), ("conv2/bias", (64,)),
        ("dense1/kernel", (256, 128)), ("dense1/bias", (128,)),
        ("dense2/kernel", (128, 10)), ("dense2/bias", (10,)),
    ]
    assert [(t.name, t.shape) for t in model.layout] == expected
    offset = 0
    for t in model.layout:  # contiguous, in order, covering θ
        assert t.offset == offset, t.name
        assert t.size == int(np.prod(t.shape))
        offset += t.size
    assert offset == model.n_params == 86_282


def test_softmax_layout():
    model = models.get_model("softmax")
    assert [(t.name, t.shape, t.offset) for t in model.layout] == [("W", (784, 10), 0)]


def keras_cnn(image_size=28, filters=(32, 64), kernel=5, hidden=128):
    """The CNN of DESIGN.md written with Keras layers, in float64."""
    keras = tf.keras
    f64 = "float64"

    def leaky():
        return keras.layers.LeakyReLU(negative_slope=0.01, dtype=f64)

    return keras.Sequential([
        keras.Input((image_size, image_size, 1), dtype=f64),
        keras.layers.Conv2D(filters[0], kernel, dtype=f64), keras.layers.MaxPool2D(2, dtype=f64),
        leaky(),
        keras.layers.Conv2D(filters[1], kernel, dtype=f64), keras.layers.MaxPool2D(2, dtype=f64),
        leaky(),
        keras.layers.MaxPool2D(2, dtype=f64), keras.layers.Flatten(dtype=f64),
        keras.layers.Dense(hidden, dtype=f64), leaky(),
        keras.layers.Dense(10, dtype=f64), leaky(),
    ])


@pytest.mark.parametrize("spec", [cases.FULL_MODELS[1], cases.CNN_TINY],
                         ids=lambda s: f"cnn-{s['n_params']}")
def test_cnn_logits_match_keras(spec):
    """Keras' weights cut from θ in Keras' own weight order give the same logits:
    θ is in the canonical order (layer order, C-order flattening, Keras layouts)."""
    model = cases.build_model(spec)
    reference = keras_cnn(**spec["config"])
    rng = np.random.default_rng(7)
    theta = model.init(3) + 0.05 * rng.standard_normal(model.n_params)  # nonzero biases
    weights, offset = [], 0
    for w in reference.weights:
        shape = tuple(w.shape)
        size = int(np.prod(shape))
        weights.append(theta[offset:offset + size].reshape(shape))
        offset += size
    assert offset == model.n_params
    reference.set_weights(weights)

    s = model.image_size
    images = rng.uniform(0.0, 1.0, (5, s, s, 1))
    ours = model.logits(tf.constant(theta), tf.constant(images)).numpy()
    theirs = reference(images).numpy()
    assert ours.shape == (5, 10)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12 * np.abs(theirs).max())


def test_softmax_logits_are_x_times_w():
    model = models.get_model("softmax", image_size=5)
    rng = np.random.default_rng(8)
    theta = rng.standard_normal(model.n_params)
    images = rng.uniform(0.0, 1.0, (4, 5, 5, 1))
    logits = model.logits(tf.constant(theta), tf.constant(images)).numpy()
    expected = images.reshape(4, 25) @ theta.reshape(25, 10)  # θ = W (pixels, classes), C order
    np.testing.assert_allclose(logits, expected, rtol=1e-13, atol=1e-13)


def test_cnn_init_is_deterministic_per_seed():
    model = models.get_model("cnn")
    a, b, c = model.init(0), model.init(0), model.init(1)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    for t in model.layout:
        block = a[t.offset:t.offset + t.size]
        if t.name.endswith("bias"):
            assert not block.any(), f"{t.name} should start at zero"
        else:
            assert np.count_nonzero(block) == t.size, f"{t.name} should be random"
            assert np.abs(block).max() <= 1.0


@pytest.mark.parametrize("seed", [0, 1, 123])
def test_softmax_init_is_zero(seed):
    theta = models.get_model("softmax").init(seed)
    assert theta.shape == (7_840,) and theta.dtype == np.float64
    assert not theta.any()


def test_bad_model_requests_raise():
    with pytest.raises(HessmpiError, match="softmax"):
        models.get_model("resnet")
    with pytest.raises(HessmpiError, match="too small"):
        models.get_model("cnn", image_size=8)


class PlainCNN(models.CNN):
    """The CNN with TensorFlow's own max-pool and bias addition, whose derivatives models.CNN
    must reproduce."""

    def logits(self, theta, images):
        k1, b1, k2, b2, w3, b3, w4, b4 = self.unflatten(theta)

        def pool(h):
            return tf.nn.max_pool2d(h, 2, 2, "VALID")

        h = tf.nn.leaky_relu(pool(tf.nn.conv2d(images, k1, 1, "VALID") + b1), models.LEAK)
        h = tf.nn.leaky_relu(pool(tf.nn.conv2d(h, k2, 1, "VALID") + b2), models.LEAK)
        h = tf.reshape(pool(h), (tf.shape(h)[0], w3.shape[0]))
        h = tf.nn.leaky_relu(tf.matmul(h, w3) + b3, models.LEAK)
        return tf.nn.leaky_relu(tf.matmul(h, w4) + b4, models.LEAK)


@pytest.fixture(scope="module")
def cnn_pair():
    """(models.CNN, PlainCNN): one object each, so that their TensorFlow functions are traced
    once for every case of the test below."""
    return models.get_model("cnn"), PlainCNN()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("point", ["init", "center-tap"])
def test_cnn_derivatives_match_tensorflow_pooling_on_ties(dtype, point, cnn_pair):
    """On real digits the CNN's gradient and HVP (both modes) equal those of TensorFlow's own
    max-pool to rounding, also where pooling windows tie: each window's derivative goes to
    the element tf.nn.max_pool2d's gradient picks. Ties of identical patches (the zero
    background) would not notice a different pick, so at "center-tap" the first kernels
    only see their center pixel: equal pixels inside a stroke tie with different patches."""
    from hessmpi import data
    from hessmpi.curvature import HVP_MODES, LocalCurvature

    ds = data.load("mnist-5k")
    x, y = ds.train_images[:20], np.array(ds.train_labels[:20])
    ours, reference = cnn_pair
    rng = np.random.default_rng(11)
    theta = ours.init(0)
    if point == "center-tap":
        theta = ours.init(1) + 0.05 * rng.standard_normal(ours.n_params)
        k1 = theta[:800].reshape(5, 5, 1, 32)
        k1[:2], k1[3:], k1[:, :2], k1[:, 3:] = 0, 0, 0, 0
    v = rng.standard_normal(ours.n_params)

    k1, b1 = theta[:800].reshape(5, 5, 1, 32), theta[800:832]
    z = tf.nn.conv2d(x.reshape(-1, 28, 28, 1) / 255.0, k1, 1, "VALID").numpy() + b1
    windows = z.reshape(-1, 12, 2, 12, 2, 32)
    top = windows.max(axis=(2, 4), keepdims=True)
    ties = (windows == top).sum(axis=(2, 4)) > 1
    assert ties.mean() > 0.1
    if point == "center-tap":
        assert (ties & (top[:, :, 0, :, 0] != b1)).sum() > 1000  # ties off the background

    tol = 1e-12 if dtype == "float64" else 1e-5
    for mode in HVP_MODES:
        results = []
        for model in (reference, ours):
            curvature = LocalCurvature(model, x, y, dtype, hvp_mode=mode)
            curvature.set_params(theta)
            results.append((curvature.loss_grad()[1], curvature.hvp(v)))
        (g0, h0), (g1, h1) = results
        np.testing.assert_allclose(g1, g0, rtol=0, atol=tol * np.abs(g0).max())
        np.testing.assert_allclose(h1, h0, rtol=0, atol=tol * np.abs(h0).max())
