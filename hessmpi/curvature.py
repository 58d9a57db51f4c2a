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
        if micro_batch < 1:
            raise HessmpiError(f"micro-batch size must be at least 1, got {micro_batch}")
        s = model.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 1) or len(images) != len(labels):
            raise HessmpiError(f"{model.name}: expected images (n, {s}, {s}, 1) and n labels, "
                               f"got {images.shape} and {labels.shape}")
        self.model = model
        self.dtype = tf.as_dtype(dtype)
        self.n_samples = len(labels)
        self.n_params = model.n_params
        self.chunk_starts = list(range(0, self.n_samples, micro_batch))
        self.chunks = [(tf.constant(images[i:i + micro_batch], self.dtype),
                        tf.constant(labels[i:i + micro_batch], tf.int64))
                       for i in self.chunk_starts]
        self.theta = None
        n = self.n_params
        vec = tf.TensorSpec((n,), self.dtype)
        batch = (tf.TensorSpec((None, s, s, 1), self.dtype), tf.TensorSpec((None,), tf.int64))
        self._loss_grad = tf.function(self._loss_grad_fn, input_signature=(vec, *batch))
        hvp_fn = self._hvp_rr if hvp_mode == "reverse-over-reverse" else self._hvp_fr
        self._hvp = tf.function(hvp_fn, input_signature=(vec, vec, *batch))
        self._ggn = tf.function(self._ggn_fn, input_signature=(vec, vec, *batch))
        self._correct = tf.function(self._correct_fn, input_signature=(vec, *batch))

    def _loss_sum(self, theta, x, y):
        logits = self.model.logits(theta, x)
        return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))

    def _loss_grad_fn(self, theta, x, y):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = self._loss_sum(theta, x, y)
        return loss, tape.gradient(loss, theta)

    def _hvp_rr(self, theta, v, x, y):
        with tf.GradientTape() as outer:
            outer.watch(theta)
            with tf.GradientTape() as inner:
                inner.watch(theta)
                loss = self._loss_sum(theta, x, y)
            g = inner.gradient(loss, theta)
            gv = tf.reduce_sum(g * tf.stop_gradient(v))
        return outer.gradient(gv, theta)

    def _hvp_fr(self, theta, v, x, y):
        with tf.autodiff.ForwardAccumulator(theta, v) as acc:
            with tf.GradientTape() as tape:
                tape.watch(theta)
                loss = self._loss_sum(theta, x, y)
            g = tape.gradient(loss, theta)
        return acc.jvp(g)

    def _ggn_fn(self, theta, v, x, y):
        # J·v by forward mode, times the softmax cross-entropy Hessian in logit space
        # (diag(p) − ppᵀ, the same for every label), then Jᵀ(·) by reverse mode.
        with tf.GradientTape() as tape:
            tape.watch(theta)
            with tf.autodiff.ForwardAccumulator(theta, v) as acc:
                logits = self.model.logits(theta, x)
            jv = acc.jvp(logits)
        p = tf.nn.softmax(logits)
        hjv = p * jv - p * tf.reduce_sum(p * jv, axis=1, keepdims=True)
        return tape.gradient(logits, theta, output_gradients=tf.stop_gradient(hjv))

    def _correct_fn(self, theta, x, y):
        pred = tf.argmax(self.model.logits(theta, x), axis=1)
        return tf.reduce_sum(tf.cast(tf.equal(pred, y), tf.int64))

    def set_params(self, theta: np.ndarray) -> None:
        """Fix the point θ at which loss, gradient and HVPs are evaluated."""
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape != (self.n_params,):
            raise HessmpiError(f"{self.model.name} has {self.n_params:,} parameters; "
                               f"got a vector of shape {theta.shape}")
        self.theta = tf.constant(theta, self.dtype)

    def _check_point(self):
        if self.theta is None:
            raise RuntimeError("call set_params(theta) first")

    def loss_grad(self) -> tuple[float, np.ndarray]:
        """(Σ loss, Σ gradient) over the shard at the current θ, in float64."""
        self._check_point()
        loss, grad = 0.0, np.zeros(self.n_params)
        for x, y in self.chunks:
            l, g = self._loss_grad(self.theta, x, y)
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

    def _product(self, fn, v, samples):
        self._check_point()
        out = np.zeros(self.n_params)
        pieces = self._pieces(samples)
        if not pieces:
            return out
        tv = tf.constant(v, self.dtype)
        for x, y in pieces:
            out += fn(self.theta, tv, x, y).numpy()
        return out

    def hvp(self, v: np.ndarray, samples: slice | None = None) -> np.ndarray:
        """Σ ∇²ℓᵢ(θ)·v over the shard (or its rows `samples`) at the current θ, in float64."""
        return self._product(self._hvp, v, samples)

    def ggn(self, v: np.ndarray, samples: slice | None = None) -> np.ndarray:
        """Σ Jᵢᵀ(∇²_z ℓᵢ)Jᵢ·v over the shard (or its rows `samples`) at the current θ, in
        float64: the generalized Gauss-Newton product, positive semi-definite."""
        return self._product(self._ggn, v, samples)

    def n_correct(self) -> int:
        """How many shard samples the model at θ classifies correctly."""
        self._check_point()
        return sum(int(self._correct(self.theta, x, y)) for x, y in self.chunks)

    def tracing_count(self, kind: str = "hessian") -> int:
        """How many times the HVP (or, kind="ggn", the GGN) function has been traced (1 after first use)."""
        return (self._ggn if kind == "ggn" else self._hvp).experimental_get_tracing_count()
