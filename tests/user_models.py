"""Tiny Keras models of many kinds, for tests/test_user_models.py (and `user_models:NAME`
specs of hessmpi.load_model).

Every builder returns a built model whose layers and model carry explicit names (so that
variable paths are the same for every copy built in one process) and whose weights are
set from a numpy generator of `seed`: the same model on every rank and at every call.
BatchNormalization gets non-trivial moving statistics, so that inference mode matters.
Floating layers compute in `dtype` (float64 unless asked otherwise).
"""

from __future__ import annotations

import numpy as np


def randomize(model, seed: int, scale: float = 0.5):
    """Set every weight of model from np.random.default_rng(seed): N(0, scale²) for kernels,
    biases and embeddings, 1 + N(0, 0.3²) for BatchNormalization's gamma, moving means
    N(0, 0.5²) and moving variances uniform in [0.5, 2]. Returns the model."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        shape, name = tuple(v.shape), v.path.split("/")[-1]
        if name == "gamma":
            value = 1.0 + 0.3 * rng.standard_normal(shape)
        elif name == "moving_variance":
            value = rng.uniform(0.5, 2.0, shape)
        elif name == "moving_mean":
            value = 0.5 * rng.standard_normal(shape)
        else:
            value = scale * rng.standard_normal(shape)
        v.assign(value.astype(v.dtype))
    return model


def mlp_bn(seed: int = 0, dtype: str = "float64"):
    """Dense(6, tanh) → BatchNormalization → Dropout(0.3) → Dense(3) logits on 4 features
    (63 parameters), compiled with sparse categorical cross-entropy from logits."""
    import keras
    from keras import layers

    inputs = keras.Input((4,), dtype=dtype, name="features")
    h = layers.Dense(6, activation="tanh", dtype=dtype, name="hidden")(inputs)
    h = layers.BatchNormalization(dtype=dtype, name="norm")(h)
    h = layers.Dropout(0.3, dtype=dtype, name="drop")(h)
    outputs = layers.Dense(3, dtype=dtype, name="logits")(h)
    model = keras.Model(inputs, outputs, name="mlp_bn")
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return randomize(model, seed)


def cnn_residual(seed: int = 1, dtype: str = "float64"):
    """A functional CNN on 5×5×1 images: conv1 (tanh) → conv2, added back to conv1's output
    (residual), tanh, global average pooling, Dense(3) logits (67 parameters)."""
    import keras
    from keras import layers

    inputs = keras.Input((5, 5, 1), dtype=dtype, name="image")
    c1 = layers.Conv2D(2, 3, padding="same", activation="tanh", dtype=dtype, name="conv1")(inputs)
    c2 = layers.Conv2D(2, 3, padding="same", dtype=dtype, name="conv2")(c1)
    h = layers.Add(dtype=dtype, name="residual")([c1, c2])
    h = layers.Activation("tanh", dtype=dtype, name="act")(h)
    h = layers.GlobalAveragePooling2D(dtype=dtype, name="pool")(h)
    outputs = layers.Dense(3, dtype=dtype, name="logits")(h)
    return randomize(keras.Model(inputs, outputs, name="cnn_residual"), seed)


def two_inputs(seed: int = 2, dtype: str = "float64"):
    """Two inputs by name, {'image': 4×4×1, 'extra': 3}: a conv branch with global average
    pooling and a dense branch, concatenated, Dense(3) logits (50 parameters)."""
    import keras
    from keras import layers

    image = keras.Input((4, 4, 1), dtype=dtype, name="image")
    extra = keras.Input((3,), dtype=dtype, name="extra")
    a = layers.Conv2D(2, 3, activation="tanh", dtype=dtype, name="conv")(image)
    a = layers.GlobalAveragePooling2D(dtype=dtype, name="pool")(a)
    b = layers.Dense(3, activation="tanh", dtype=dtype, name="side")(extra)
    h = layers.Concatenate(dtype=dtype, name="join")([a, b])
    outputs = layers.Dense(3, dtype=dtype, name="logits")(h)
    return randomize(keras.Model({"image": image, "extra": extra}, outputs, name="two_inputs"), seed)


def gru_tokens(seed: int = 3, dtype: str = "float64"):
    """Embedding(7 tokens, 3) → GRU(2) → Dense(2) logits on sequences of 4 integer tokens
    (69 parameters)."""
    import keras
    from keras import layers

    inputs = keras.Input((4,), dtype="int32", name="tokens")
    h = layers.Embedding(7, 3, dtype=dtype, name="embed")(inputs)
    h = layers.GRU(2, dtype=dtype, name="gru")(h)
    outputs = layers.Dense(2, dtype=dtype, name="logits")(h)
    return randomize(keras.Model(inputs, outputs, name="gru_tokens"), seed)


def regression_mlp(seed: int = 4, dtype: str = "float64"):
    """Dense(5, tanh) → LayerNormalization → Dense(2) on 3 features (42 parameters): a
    regression model. `user_models:regression_mlp` as a model spec."""
    import keras
    from keras import layers

    model = keras.Sequential([keras.Input((3,), dtype=dtype, name="features"),
                              layers.Dense(5, activation="tanh", dtype=dtype, name="hidden"),
                              layers.LayerNormalization(dtype=dtype, name="norm"),
                              layers.Dense(2, dtype=dtype, name="out")], name="regression_mlp")
    return randomize(model, seed)


def autoencoder(seed: int = 5, dtype: str = "float64"):
    """4 features → Dense(2, tanh) code → Dense(4) reconstruction (22 parameters)."""
    import keras
    from keras import layers

    inputs = keras.Input((4,), dtype=dtype, name="features")
    code = layers.Dense(2, activation="tanh", dtype=dtype, name="encoder")(inputs)
    outputs = layers.Dense(4, dtype=dtype, name="decoder")(code)
    return randomize(keras.Model(inputs, outputs, name="autoencoder"), seed)


def regularized(seed: int = 6, dtype: str = "float64"):
    """Dense(5, tanh, L2 kernel penalty) → Dense(3, softmax, L1+L2 kernel penalty) on 4
    features (43 parameters): probabilities for categorical cross-entropy."""
    import keras
    from keras import layers, regularizers

    model = keras.Sequential([
        keras.Input((4,), dtype=dtype, name="features"),
        layers.Dense(5, activation="tanh", kernel_regularizer=regularizers.L2(0.05), dtype=dtype, name="hidden"),
        layers.Dense(3, activation="softmax", kernel_regularizer=regularizers.L1L2(l1=0.01, l2=0.02),
                     dtype=dtype, name="probs"),
    ], name="regularized")
    return randomize(model, seed)


def _subclassed_class():
    import keras

    class Tower(keras.Model):
        """out = d2(tanh(d1(x))) + skip(x): a subclassed model with its own call."""

        def __init__(self, hidden: int = 4, **kwargs):
            super().__init__(**kwargs)
            self.hidden = hidden
            dtype = self.dtype_policy.name
            self.d1 = keras.layers.Dense(hidden, activation="tanh", dtype=dtype, name="d1")
            self.d2 = keras.layers.Dense(1, dtype=dtype, name="d2")
            self.skip = keras.layers.Dense(1, use_bias=False, dtype=dtype, name="skip")

        def call(self, x, training=False):
            return self.d2(self.d1(x)) + self.skip(x)

        def get_config(self):
            return {**super().get_config(), "hidden": self.hidden}

    return Tower


_TOWER = None


def subclassed(seed: int = 7, dtype: str = "float64"):
    """A subclassed model on 3 features with one logit (24 parameters), built by a call."""
    global _TOWER
    if _TOWER is None:
        _TOWER = _subclassed_class()
    model = _TOWER(hidden=4, dtype=dtype, name="tower")
    model(np.zeros((1, 3), dtype=dtype))
    return randomize(model, seed)
