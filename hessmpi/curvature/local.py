"""Loss, gradient, exact Hessian-vector and Gauss-Newton-vector products on one rank's samples (TensorFlow).

Every quantity is a *sum* over the rank's samples (or over a contiguous range of them,
`samples=slice(a, b)`, as the error bars need); the distributed operator adds the
ranks' sums and divides by the global sample count. The samples come in micro-batches
of bounded size (`data.LocalShard`), so memory per rank stays bounded whatever the
shard size, and each TensorFlow function is traced once per model, loss, dtype and
input signature (the batch dimension is left open).

The model's own regularization terms (its variables' regularizers, what `model.losses`
holds) are part of the objective: mean loss + penalty(θ). A LocalCurvature given
`penalty_weight` w adds w·penalty to its loss and w·∇penalty, w·∇²penalty·v to its
sums; the Problem gives w = N to one rank, so that the mean over N samples gains the
penalty once. Sums over a range of samples (`samples=`) leave it out.
"""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..errors import HessmpiError

HVP_MODES = ("reverse-over-reverse", "forward-over-reverse")
LOSS_GRAD, HVP, GGN, CORRECT = range(4)


class LocalCurvature:
    """The loss on this rank's samples as a function of θ, with its gradient and curvature products.

    `set_params(theta)` fixes the point; `hvp(v)` then returns Σᵢ ∇²ℓᵢ(θ)·v and `ggn(v)`
    Σᵢ Jᵢᵀ (∇²_z ℓᵢ) Jᵢ·v (the generalized Gauss-Newton product, Jᵢ the Jacobian of
    sample i's model outputs z with respect to θ) over the samples, as float64 whatever
    the compute dtype (the model's: `model.dtype`).
    """

    def __init__(self, model, loss, shard, hvp_mode: str = "reverse-over-reverse", penalty_weight: float = 0.0):
        if hvp_mode not in HVP_MODES:
            raise HessmpiError(f"unknown HVP mode {hvp_mode!r}: choose one of {', '.join(HVP_MODES)}")
        tf = runtime.import_tensorflow()
        self.model, self.loss, self.hvp_mode = model, loss, hvp_mode
        self.dtype = tf.as_dtype(model.dtype)
        self.n_params = model.n_params
        self.theta = None
        self.penalty = model.has_penalty
        self.set_samples(shard, penalty_weight)

    def set_samples(self, shard, penalty_weight: float = 0.0) -> None:
        """Hold these samples (a data.LocalShard: the rank's block, a mini-batch, possibly
        none); θ stays, and nothing is retraced for a shard of the same kind."""
        self.shard = shard
        self.n_samples = shard.n_samples
        self.penalty_weight = float(penalty_weight) if self.penalty else 0.0
        self._fns = _functions(self.model, self.loss, self.hvp_mode, shard)

    def set_params(self, theta: np.ndarray) -> None:
        """Fix the point θ at which loss, gradient and products are evaluated."""
        tf = runtime.import_tensorflow()
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape != (self.n_params,):
            raise HessmpiError(f"{self.model.name} has {self.n_params:,} parameters; "
                               f"got a vector of shape {theta.shape}")
        self.theta = tf.constant(theta, self.dtype)

    def _check_point(self):
        if self.theta is None:
            raise RuntimeError("call set_params(theta) first")

    def loss_grad(self) -> tuple[float, np.ndarray]:
        """(Σ loss, Σ gradient) over the samples at the current θ, in float64."""
        self._check_point()
        loss, grad = 0.0, np.zeros(self.n_params)
        for x, y in self.shard.batches():
            value, g = self._fns[LOSS_GRAD](self.theta, x, y)
            loss += float(value)
            grad += g.numpy()
        if self.penalty_weight:
            value, g = self.penalty_value_grad()
            loss += self.penalty_weight * value
            grad += self.penalty_weight * g
        return loss, grad

    def _product(self, which: int, v: np.ndarray, samples: slice | None) -> np.ndarray:
        tf = runtime.import_tensorflow()
        self._check_point()
        out = np.zeros(self.n_params)
        tv = tf.constant(v, self.dtype)
        try:
            for x, y in self.shard.batches(samples):
                out += self._fns[which](self.theta, tv, x, y).numpy()
        except (TypeError, ValueError) as e:  # raised while tracing
            if which == HVP and self.hvp_mode == "forward-over-reverse":
                raise HessmpiError(f"forward-over-reverse HVPs do not pass through this model "
                                   f"({str(e).strip().splitlines()[-1][:200]}); use reverse-over-reverse") from None
            raise
        if self.penalty_weight and samples is None:
            out += self.penalty_weight * self.penalty_hvp(v)
        return out

    def hvp(self, v: np.ndarray, samples: slice | None = None) -> np.ndarray:
        """Σ ∇²ℓᵢ(θ)·v over the samples (or the rows `samples` of them) at θ, in float64."""
        return self._product(HVP, v, samples)

    def ggn(self, v: np.ndarray, samples: slice | None = None) -> np.ndarray:
        """Σ Jᵢᵀ(∇²_z ℓᵢ)Jᵢ·v over the samples (or the rows `samples`) at θ, in float64: the
        generalized Gauss-Newton product, positive semi-definite for a loss convex in the
        outputs. The penalty enters with its Hessian."""
        return self._product(GGN, v, samples)

    def penalty_value_grad(self) -> tuple[float, np.ndarray]:
        """(penalty(θ), ∇penalty(θ)) of the model's regularization terms at θ (zero without), float64."""
        if not self.penalty:
            return 0.0, np.zeros(self.n_params)
        self._check_point()
        value, g = _penalty_functions(self.model)[0](self.theta)
        return float(value), g.numpy().astype(np.float64)

    def penalty_hvp(self, v: np.ndarray) -> np.ndarray:
        """∇²penalty(θ)·v (zero for a model without regularizers), float64."""
        tf = runtime.import_tensorflow()
        if not self.penalty:
            return np.zeros(self.n_params)
        self._check_point()
        return _penalty_functions(self.model)[1](self.theta, tf.constant(v, self.dtype)).numpy().astype(np.float64)

    def n_correct(self) -> int | None:
        """How many samples the model at θ classifies correctly; None for a loss that is not
        a classification loss."""
        self._check_point()
        if self._fns[CORRECT] is None:
            return None
        return sum(int(self._fns[CORRECT](self.theta, x, y)) for x, y in self.shard.batches())

    def tracing_count(self, kind: str = "hessian") -> int:
        """How many times the HVP (or, kind="ggn", the GGN) function has been traced: 1 after first
        use, and still 1 after any number of LocalCurvatures of the same model, loss and samples' kind."""
        return self._fns[GGN if kind == "ggn" else HVP].experimental_get_tracing_count()


def _functions(model, loss, hvp_mode: str, shard) -> tuple:
    """(loss_grad, hvp, ggn, correct): the TensorFlow functions of model and loss for the shard's
    kind of micro-batches (correct is None for a loss that does not classify).

    Built once per model object, loss, HVP mode and micro-batch signature and kept on the
    model, so every LocalCurvature of that model (one per shard, batch size or mini-batch)
    shares them: each is traced once per process (the batch dimension is unknown in the
    signatures). Tracing a fresh function per instance cost ~1 s for the CNN each time.
    """
    tf = runtime.import_tensorflow()
    x_spec, y_spec = shard.spec
    cache = model.__dict__.setdefault("_tf_functions", {})
    key = (loss.key, hvp_mode, shard.pixels, repr(x_spec), repr(y_spec))
    if key in cache:
        return cache[key]
    dtype = tf.as_dtype(model.dtype)
    vec = tf.TensorSpec((model.n_params,), dtype)
    inputs = input_transform(shard.pixels, dtype)

    def loss_sum(theta, x, y):
        return tf.reduce_sum(loss.per_sample(y, model.outputs(theta, inputs(x))))

    def loss_grad(theta, x, y):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            value = loss_sum(theta, x, y)
        return value, tape.gradient(value, theta)

    def hvp_rr(theta, v, x, y):
        # Reverse over reverse: measured fastest here (bench/hvp_cost.py). vᵀ∂g/∂θ by
        # output_gradients, not as ∂(g·v)/∂θ, which TensorFlow differentiates on both sides.
        with tf.GradientTape() as outer:
            outer.watch(theta)
            with tf.GradientTape() as inner:
                inner.watch(theta)
                value = loss_sum(theta, x, y)
            g = inner.gradient(value, theta)
        return outer.gradient(g, theta, output_gradients=v)

    def hvp_fr(theta, v, x, y):
        with tf.autodiff.ForwardAccumulator(theta, v) as acc:
            with tf.GradientTape() as tape:
                tape.watch(theta)
                value = loss_sum(theta, x, y)
            g = tape.gradient(value, theta)
        return acc.jvp(g)

    def ggn(theta, v, x, y):
        # J·v as the transpose of the vector-Jacobian product u ↦ Jᵀu (reverse over reverse:
        # works through any layer, recurrent ones included, where forward mode does not, and
        # measured 17% faster than forward mode on the CNN), times the loss's Hessian in the
        # outputs z, then Jᵀ(·).
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(theta)
            z = model.outputs(theta, inputs(x))
        u = tf.zeros_like(z)
        with tf.GradientTape() as linear:
            linear.watch(u)
            jt_u = tape.gradient(z, theta, output_gradients=u)
        jv = linear.gradient(jt_u, u, output_gradients=v)
        zs = tf.stop_gradient(z)
        with tf.GradientTape() as outer:
            outer.watch(zs)
            with tf.GradientTape() as inner:
                inner.watch(zs)
                value = tf.reduce_sum(loss.per_sample(y, zs))
            gz = inner.gradient(value, zs)
        hjv = outer.gradient(gz, zs, output_gradients=jv)
        return tape.gradient(z, theta, output_gradients=tf.stop_gradient(hjv))

    def correct(theta, x, y):
        return loss.n_correct(y, model.outputs(theta, inputs(x)))

    hvp = hvp_rr if hvp_mode == "reverse-over-reverse" else hvp_fr
    classifies = loss.kind in ("sparse", "categorical", "binary")
    cache[key] = (tf.function(loss_grad, input_signature=(vec, x_spec, y_spec)),
                  tf.function(hvp, input_signature=(vec, vec, x_spec, y_spec)),
                  tf.function(ggn, input_signature=(vec, vec, x_spec, y_spec)),
                  tf.function(correct, input_signature=(vec, x_spec, y_spec)) if classifies else None)
    return cache[key]


def input_transform(pixels: bool, dtype):
    """The function that turns a micro-batch's x into the model's inputs inside a traced
    function: pixels (uint8) → [0, 1] by a table of k/255 in float64 rounded to dtype (the
    same numbers as dividing in numpy, which an in-graph division is not: TensorFlow may
    rewrite x/255 as x·(1/255)); anything else as it is."""
    tf = runtime.import_tensorflow()
    if not pixels:
        return lambda x: x
    pixel_values = tf.constant((np.arange(256) / 255).astype(tf.as_dtype(dtype).as_numpy_dtype))
    return lambda x: tf.gather(pixel_values, tf.cast(x, tf.int32))


def _penalty_functions(model) -> tuple:
    """(value_grad, hvp) of the model's weight regularizers as TensorFlow functions of θ."""
    tf = runtime.import_tensorflow()
    cache = model.__dict__.setdefault("_tf_functions", {})
    if "penalty" in cache:
        return cache["penalty"]
    vec = tf.TensorSpec((model.n_params,), tf.as_dtype(model.dtype))

    def value_grad(theta):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            value = model.penalty(theta)
        return value, tape.gradient(value, theta)

    def hvp(theta, v):
        with tf.GradientTape() as outer:
            outer.watch(theta)
            with tf.GradientTape() as inner:
                inner.watch(theta)
                value = model.penalty(theta)
            g = inner.gradient(value, theta)
        out = outer.gradient(g, theta, output_gradients=v)
        return tf.zeros_like(theta) if out is None else out  # a penalty linear in θ (L1 away from 0)

    cache["penalty"] = (tf.function(value_grad, input_signature=(vec,)), tf.function(hvp, input_signature=(vec, vec)))
    return cache["penalty"]
