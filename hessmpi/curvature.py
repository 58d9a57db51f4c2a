"""Loss, gradient, exact Hessian-vector and Gauss-Newton-vector products on one rank's shard (TensorFlow).

Every quantity is a *sum* over the shard's samples (or over a contiguous range of
them, `samples=slice(a, b)`, as the error bars of `uncertainty.py` need); the
distributed operator adds the shards and divides by the global sample count. The
shard is split into micro-batches of fixed maximum size so that memory per rank
stays bounded whatever the shard size, and each TensorFlow function is traced once
(the batch dimension is left unknown in its signature).
"""

from __future__ import annotations

import numpy as np

from . import runtime

tf = runtime.import_tensorflow()
from .errors import HessmpiError
from .models import Model

DTYPES = ("float64", "float32")
HVP_MODES = ("reverse-over-reverse", "forward-over-reverse")


class LocalCurvature:
    """The loss on a shard as a function of θ, with its gradient and curvature products.

    `set_params(theta)` fixes the point; `hvp(v)` then returns Σᵢ ∇²ℓᵢ(θ)·v and `ggn(v)`
    Σᵢ Jᵢᵀ (∇²_z ℓᵢ) Jᵢ·v (the generalized Gauss-Newton product, Jᵢ the Jacobian of
    sample i's logits z with respect to θ) over the shard's samples, as float64
    whatever the compute dtype.
    """

    def __init__(self, model: Model, images: np.ndarray, labels: np.ndarray,
                 dtype: str = "float64", micro_batch: int = 1000,
                 hvp_mode: str = "reverse-over-reverse"):
        if dtype not in DTYPES:
            raise HessmpiError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        if hvp_mode not in HVP_MODES:
            raise HessmpiError(f"unknown HVP mode {hvp_mode!r}: choose one of {', '.join(HVP_MODES)}")
        self.model = model
        self.dtype = tf.as_dtype(dtype)
        self.n_params = model.n_params
        self.set_samples(images, labels, micro_batch)
        self.theta = None
        self._kinds = {kind: _functions(model, self.dtype, hvp_mode, kind == tf.uint8)
                       for kind in (tf.uint8, self.dtype)}

    def set_params(self, theta: np.ndarray) -> None:
        """Fix the point θ at which loss, gradient and HVPs are evaluated."""
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape != (self.n_params,):
            raise HessmpiError(f"{self.model.name} has {self.n_params:,} parameters; "
                               f"got a vector of shape {theta.shape}")
        self.theta = tf.constant(theta, self.dtype)

    def set_samples(self, images: np.ndarray, labels: np.ndarray, micro_batch: int) -> None:
        """Hold these samples (the shard, or e.g. a mini-batch; possibly none) in micro-batches
        of at most micro_batch: images (n, s, s, 1) in any float dtype, or uint8 pixels
        (n, s, s) or (n, s, s, 1). θ stays; the TensorFlow functions take any batch size, so
        nothing is retraced."""
        if micro_batch < 1:
            raise HessmpiError(f"micro-batch size must be at least 1, got {micro_batch}")
        s = self.model.image_size
        raw = images.dtype == np.uint8
        if (images.ndim != 4 or images.shape[1:] != (s, s, 1) or len(images) != len(labels)) and not (
                raw and images.shape[1:] == (s, s) and len(images) == len(labels)):
            raise HessmpiError(f"{self.model.name}: expected images (n, {s}, {s}, 1) and n labels, "
                               f"got {images.shape} and {labels.shape}")
        self.n_samples = len(labels)
        self.chunk_starts = list(range(0, self.n_samples, micro_batch))
        # uint8 pixels stay uint8 (a quarter of float32, an eighth of float64) and are scaled
        # inside the traced functions, so a rank's memory hardly grows with its shard.
        self.chunks = [(tf.constant(images[i:i + micro_batch].reshape(-1, s, s, 1), tf.uint8) if raw
                        else tf.constant(images[i:i + micro_batch], self.dtype),
                        tf.constant(labels[i:i + micro_batch], tf.int64))
                       for i in self.chunk_starts]

    def _check_point(self):
        if self.theta is None:
            raise RuntimeError("call set_params(theta) first")

    def loss_grad(self) -> tuple[float, np.ndarray]:
        """(Σ loss, Σ gradient) over the shard at the current θ, in float64."""
        self._check_point()
        loss, grad = 0.0, np.zeros(self.n_params)
        for x, y in self.chunks:
            l, g = self._fn(0, x)(self.theta, x, y)
            loss += float(l)
            grad += g.numpy()
        return loss, grad

    def _pieces(self, samples):
        """The (images, labels) micro-batches covering the shard rows in `samples`."""
        if samples is None:
            return self.chunks
        start, stop, step = samples.indices(self.n_samples)
        if step != 1:
            raise ValueError(f"samples must be a contiguous slice, got {samples}")
        pieces = []
        for c0, (x, y) in zip(self.chunk_starts, self.chunks):
            a, b = max(start, c0) - c0, min(stop, c0 + len(y)) - c0
            if a < b:
                pieces.append((x, y) if (a, b) == (0, len(y)) else (x[a:b], y[a:b]))
        return pieces

    def _fn(self, which: int, x):
        """Function `which` (0 loss_grad, 1 hvp, 2 ggn, 3 correct) for micro-batch x's kind
        (uint8 pixels or floats in the compute dtype)."""
        return self._kinds[x.dtype][which]

    def _product(self, which, v, samples):
        self._check_point()
        out = np.zeros(self.n_params)
        pieces = self._pieces(samples)
        if not pieces:
            return out
        tv = tf.constant(v, self.dtype)
        for x, y in pieces:
            out += self._fn(which, x)(self.theta, tv, x, y).numpy()
        return out

    def hvp(self, v: np.ndarray, samples: slice | None = None) -> np.ndarray:
        """Σ ∇²ℓᵢ(θ)·v over the shard (or its rows `samples`) at the current θ, in float64."""
        return self._product(1, v, samples)

    def ggn(self, v: np.ndarray, samples: slice | None = None) -> np.ndarray:
        """Σ Jᵢᵀ(∇²_z ℓᵢ)Jᵢ·v over the shard (or its rows `samples`) at the current θ, in
        float64: the generalized Gauss-Newton product, positive semi-definite."""
        return self._product(2, v, samples)

    def n_correct(self) -> int:
        """How many shard samples the model at θ classifies correctly."""
        self._check_point()
        return sum(int(self._fn(3, x)(self.theta, x, y)) for x, y in self.chunks)

    def tracing_count(self, kind: str = "hessian") -> int:
        """How many times the HVP (or, kind="ggn", the GGN) function has been traced: 1 after first
        use, and still 1 after any number of LocalCurvatures of the same model, dtype and mode."""
        which = 2 if kind == "ggn" else 1
        return sum(fns[which].experimental_get_tracing_count() for fns in self._kinds.values())


def _functions(model: Model, dtype, hvp_mode: str, raw: bool = False) -> tuple:
    """(loss_grad, hvp, ggn, correct): the TensorFlow functions of `model` in `dtype`.

    Built once per model object, dtype and HVP mode and kept on the model, so every
    LocalCurvature of that model (one per shard, batch size or mini-batch) shares them:
    each is traced once per process, whatever the number of instances, shard sizes or
    micro-batch sizes (the batch dimension is unknown in the signatures). Tracing a
    fresh function per instance cost ~1 s for the CNN each time and made TensorFlow warn
    about frequent retracing in rank curves.
    """
    cache = model.__dict__.setdefault("_tf_functions", {})
    key = (dtype.name, hvp_mode, raw)
    if key in cache:
        return cache[key]
    s = model.image_size
    vec = tf.TensorSpec((model.n_params,), dtype)
    batch = (tf.TensorSpec((None, s, s, 1), tf.uint8 if raw else dtype), tf.TensorSpec((None,), tf.int64))

    # raw: uint8 pixels → [0, 1] by a table of data.to_float's values (float64 k/255 rounded
    # to dtype): bit-identical to float input, which an in-graph division is not (TensorFlow
    # may rewrite x/255 as x·(1/255)).
    pixel_values = tf.constant((np.arange(256) / 255).astype(dtype.as_numpy_dtype))

    def images(x):
        return tf.gather(pixel_values, tf.cast(x, tf.int32)) if raw else x

    def loss_sum(theta, x, y):
        logits = model.logits(theta, images(x))
        return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))

    def loss_grad(theta, x, y):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = loss_sum(theta, x, y)
        return loss, tape.gradient(loss, theta)

    def hvp_rr(theta, v, x, y):
        # Reverse over reverse: measured fastest here for both models and dtypes (bench/hvp_cost.py).
        # vᵀ∂g/∂θ by output_gradients, not as ∂(g·v)/∂θ: in float32 TensorFlow differentiates the
        # product g·v for both factors, v's side included; measured faster without it.
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

    def ggn(theta, v, x, y):
        # J·v by forward mode, times the softmax cross-entropy Hessian in logit space
        # (diag(p) − ppᵀ, the same for every label), then Jᵀ(·) by reverse mode.
        with tf.GradientTape() as tape:
            tape.watch(theta)
            with tf.autodiff.ForwardAccumulator(theta, v) as acc:
                logits = model.logits(theta, images(x))
            jv = acc.jvp(logits)
        p = tf.nn.softmax(logits)
        hjv = p * jv - p * tf.reduce_sum(p * jv, axis=1, keepdims=True)
        return tape.gradient(logits, theta, output_gradients=tf.stop_gradient(hjv))

    def correct(theta, x, y):
        pred = tf.argmax(model.logits(theta, images(x)), axis=1)
        return tf.reduce_sum(tf.cast(tf.equal(pred, y), tf.int64))

    hvp = hvp_rr if hvp_mode == "reverse-over-reverse" else hvp_fr
    cache[key] = (tf.function(loss_grad, input_signature=(vec, *batch)),
                  tf.function(hvp, input_signature=(vec, vec, *batch)),
                  tf.function(ggn, input_signature=(vec, vec, *batch)),
                  tf.function(correct, input_signature=(vec, *batch)))
    return cache[key]
