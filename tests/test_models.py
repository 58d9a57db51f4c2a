"""Tests of hessmpi.models: the built-in models as Keras models (exact sizes, the canonical
order of θ, the same loss, gradient and HVP as the plain TensorFlow reference), init, specs.

Nothing here communicates: every rank runs the same small checks on its own.
"""

import numpy as np
import pytest

from hessmpi import runtime

tf = runtime.import_tensorflow()

from hessmpi.curvature import HVP_MODES, Problem  # noqa: E402
from hessmpi.data import Data  # noqa: E402
from hessmpi.errors import HessmpiError  # noqa: E402
from hessmpi.models import builtin, loading, resolve  # noqa: E402

import cases  # noqa: E402
import reference_models  # noqa: E402


@pytest.mark.parametrize("spec", cases.FULL_MODELS + [cases.SOFTMAX_TINY, cases.CNN_TINY],
                         ids=lambda s: f"{s['name']}-{s['n_params']}")
def test_parameter_count(spec):
    model = cases.build_model(spec)
    assert model.n_params == spec["n_params"] == builtin.layout(spec["name"], **spec["config"]).n_params
    assert model.params().shape == (spec["n_params"],)
    assert [v.path.split("/", 1)[1] for v in model.keras.trainable_variables] == [t.name for t in model.layout]


def test_cnn_layout_is_keras_order():
    layout = builtin.layout("cnn")
    expected = [
        ("conv1/kernel", (5, 5, 1, 32)), ("conv1/bias", (32,)),
        ("conv2/kernel", (5, 5, 32, 64)), ("conv2/bias", (64,)),
        ("dense1/kernel", (256, 128)), ("dense1/bias", (128,)),
        ("dense2/kernel", (128, 10)), ("dense2/bias", (10,)),
    ]
    assert [(t.name, t.shape) for t in layout] == expected
    offset = 0
    for t in layout:  # contiguous, in order, covering θ
        assert t.offset == offset, t.name
        assert t.size == int(np.prod(t.shape))
        offset += t.size
    assert offset == layout.n_params == 86_282
    model = cases.build_model(cases.FULL_MODELS[1])
    assert model.layout == layout and [tuple(v.shape) for v in model.keras.trainable_variables] == \
        [t.shape for t in layout]


def test_softmax_layout():
    assert [(t.name, t.shape, t.offset) for t in builtin.layout("softmax")] == [("W/kernel", (784, 10), 0)]


def keras_cnn(image_size=28, filters=(32, 64), kernel=5, hidden=128):
    """The CNN of the design written with Keras' own layers, in float64."""
    keras = runtime.import_keras()
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


@pytest.mark.parametrize("spec", [cases.FULL_MODELS[1], cases.CNN_TINY], ids=lambda s: f"cnn-{s['n_params']}")
def test_cnn_logits_match_keras(spec):
    """Keras' own layers, weights cut from θ in Keras' own weight order, give the built-in
    CNN's logits: θ is in the canonical order (layer order, C-order flattening, Keras layouts)."""
    model = cases.build_model(spec)
    reference = keras_cnn(**spec["config"])
    rng = np.random.default_rng(7)
    theta = cases.init(model, 3) + 0.05 * rng.standard_normal(model.n_params)  # nonzero biases
    weights, offset = [], 0
    for w in reference.weights:
        shape = tuple(w.shape)
        size = int(np.prod(shape))
        weights.append(theta[offset:offset + size].reshape(shape))
        offset += size
    assert offset == model.n_params
    reference.set_weights(weights)

    s = model.config.get("image_size", 28)
    images = rng.uniform(0.0, 1.0, (5, s, s, 1))
    ours = model.outputs(tf.constant(theta), tf.constant(images)).numpy()
    theirs = reference(images).numpy()
    assert ours.shape == (5, 10)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12 * np.abs(theirs).max())


def test_softmax_logits_are_x_times_w():
    model = cases.build_model({"name": "softmax", "config": {"image_size": 5}})
    rng = np.random.default_rng(8)
    theta = rng.standard_normal(model.n_params)
    images = rng.uniform(0.0, 1.0, (4, 5, 5, 1))
    logits = model.outputs(tf.constant(theta), tf.constant(images)).numpy()
    expected = images.reshape(4, 25) @ theta.reshape(25, 10)  # θ = W (pixels, classes), C order
    np.testing.assert_allclose(logits, expected, rtol=1e-13, atol=1e-13)


def test_cnn_init_is_deterministic_per_seed():
    a, b, c = builtin.init("cnn", 0), builtin.init("cnn", 0), builtin.init("cnn", 1)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    for t in builtin.layout("cnn"):
        block = a[t.offset:t.offset + t.size]
        if t.name.endswith("bias"):
            assert not block.any(), f"{t.name} should start at zero"
        else:
            assert np.count_nonzero(block) == t.size, f"{t.name} should be random"
            assert np.abs(block).max() <= 1.0
    np.testing.assert_array_equal(builtin.build("cnn", seed=1).params(), c)  # the Keras model starts there


@pytest.mark.parametrize("seed", [0, 1, 123])
def test_softmax_init_is_zero(seed):
    theta = builtin.init("softmax", seed)
    assert theta.shape == (7_840,) and theta.dtype == np.float64
    assert not theta.any()


def test_bad_model_requests_raise():
    with pytest.raises(HessmpiError, match="softmax"):
        builtin.layout("resnet")
    with pytest.raises(HessmpiError, match="too small"):
        builtin.layout("cnn", image_size=8)
    with pytest.raises(HessmpiError, match="unknown model 'resnet'"):
        loading.kind_of("resnet")


def reference_derivatives(name, config, theta, images, labels, v, dtype):
    """(loss, gradient, HVP) of the plain TensorFlow reference model, summed over the samples."""
    t = tf.as_dtype(dtype)
    th, vv = tf.constant(theta, t), tf.constant(v, t)
    x, y = tf.constant(images, t), tf.constant(labels, tf.int64)
    with tf.GradientTape() as outer:
        outer.watch(th)
        with tf.GradientTape() as inner:
            inner.watch(th)
            loss = reference_models.loss_sum(name, config, th, x, y)
        g = inner.gradient(loss, th)
    hv = outer.gradient(g, th, output_gradients=vv)
    return float(loss), g.numpy().astype(np.float64), hv.numpy().astype(np.float64)


@pytest.fixture(scope="module")
def digits():
    from hessmpi import data

    ds = data.load("mnist-5k")
    return ds.train_images[:20], np.array(ds.train_labels[:20])


@pytest.mark.parametrize("name", ["softmax", "cnn"])
def test_builtin_keras_models_equal_the_plain_reference(name, digits):
    """The Keras built-in model on the generic path has the loss, gradient and HVP of the plain
    TensorFlow model (the former hand-written one) at a random θ on real digits, to 1e-12 in
    float64, whether the digits come as uint8 pixels or as floats in [0, 1]."""
    images, labels = digits
    model = cases.build_model({"name": name, "config": {}})
    rng = np.random.default_rng(3)
    theta = builtin.init(name, 1) + 0.05 * rng.standard_normal(model.n_params)
    v = rng.standard_normal(model.n_params)
    ref = reference_derivatives(name, {}, theta, reference_models.pixels(images), labels, v, "float64")
    loss = resolve(None, model.source)
    for samples in (Data(images[..., None], labels, pixels=True), Data(reference_models.pixels(images), labels)):
        from mpi4py import MPI

        problem = Problem(model, loss, samples, MPI.COMM_SELF, micro_batch=7, theta=theta)
        value, grad = problem.curvature.loss_grad()
        hv = problem.curvature.hvp(v)
        assert abs(value - ref[0]) <= 1e-12 * abs(ref[0])
        np.testing.assert_allclose(grad, ref[1], rtol=0, atol=1e-12 * np.abs(ref[1]).max())
        np.testing.assert_allclose(hv, ref[2], rtol=0, atol=1e-12 * np.abs(ref[2]).max())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("point", ["init", "center-tap"])
def test_cnn_derivatives_match_tensorflow_pooling_on_ties(dtype, point, digits):
    """On real digits the CNN's gradient and HVP (both modes) equal those of TensorFlow's own
    max-pool to rounding, also where pooling windows tie: each window's derivative goes to
    the element tf.nn.max_pool2d's gradient picks. Ties of identical patches (the zero
    background) would not notice a different pick, so at "center-tap" the first kernels
    only see their center pixel: equal pixels inside a stroke tie with different patches."""
    from mpi4py import MPI

    x, y = digits
    ours = cases.build_model(cases.FULL_MODELS[1], dtype)
    rng = np.random.default_rng(11)
    theta = builtin.init("cnn", 0)
    if point == "center-tap":
        theta = builtin.init("cnn", 1) + 0.05 * rng.standard_normal(ours.n_params)
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
    images = reference_models.pixels(x).astype(dtype)
    _, g0, h0 = reference_derivatives("cnn", {}, theta, images, y, v, dtype)
    for mode in HVP_MODES:
        problem = Problem(ours, resolve(None, ours.source), Data(x[..., None], y, pixels=True), MPI.COMM_SELF,
                          hvp_mode=mode, theta=theta)
        g1, h1 = problem.curvature.loss_grad()[1], problem.curvature.hvp(v)
        np.testing.assert_allclose(g1, g0, rtol=0, atol=tol * np.abs(g0).max())
        np.testing.assert_allclose(h1, h0, rtol=0, atol=tol * np.abs(h0).max())


def test_a_saved_builtin_model_loads_back(tmp_path):
    """A built-in model saved with Keras loads back (its layers are registered) with the same
    θ, layout and outputs."""
    model = cases.build_model(cases.CNN_TINY)
    path = str(tmp_path / "cnn.keras")
    model.source.save(path)
    loaded = loading.load_model(path)
    x = np.random.default_rng(0).uniform(0, 1, (3, 16, 16, 1))
    th = tf.constant(model.params())
    assert loaded.layout == model.layout and loaded.name == path
    np.testing.assert_array_equal(loaded.params(), model.params())
    np.testing.assert_allclose(loaded.outputs(th, x).numpy(), model.outputs(th, x).numpy(), rtol=1e-14)
