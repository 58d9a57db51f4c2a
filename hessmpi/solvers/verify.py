"""Checks that a Problem's derivatives are what they claim, before any solve.

Central finite differences of the loss (against the gradient) and of the gradient
(against the HVP) along a random direction d for steps ε = 0.5^k, the symmetry ratio
2|yᵀHx − xᵀHy| / (|yᵀHx| + |xᵀHy|), and determinism (the same product twice). All
functions are collective: every rank takes the same decisions.

ReLU, LeakyReLU, max-pooling, comparisons that pick a branch (Huber) and the other ops
in `PATTERNS` make the loss non-smooth wherever one of them switches (a pre-activation
changes sign, a pooling window changes its maximum): a finite difference whose segment
[θ − εd, θ + εd] holds such a kink measures the kink, not the code. So the activation
pattern of every such op in the traced loss is compared at θ and θ ± εd on every rank's
samples, the largest step with no switch found by bisection, and a step used only if
nothing switched. Steps must also be resolved by the compute dtype (θ ± εd rounded to it
still differs by 2εd to a tenth of the tolerance). The steps are the usual 0.5^4 … 0.5^19
below the nearest kink, or at least six steps from the nearest kink down. Kinks sit
closer to θ the more samples and units there are (about 1e-7 for the CNN on 500
digits), so the loss differences are summed exactly from per-sample differences: a
difference of two mean losses would be rounding noise at such steps.

A finite-difference check passes if its best error is within the tolerance. Otherwise it
fails only if the finite differences are sure of themselves: three successive steps agree
with each other ten times better than with the product. Otherwise it is "not checkable"
and says why: no kink-free step, finite differences that are rounding noise, or kinks
inside loops (`tf.while_loop`) or nested functions that cannot be located.

Kinks at θ itself (zero biases over an image's blank border make pre-activations exactly
zero at a CNN's initialisation) leave no usable step, so `run_all` checks at θ plus a
small seeded perturbation (`perturb`, relative to ‖θ‖/√n).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from .. import runtime
from ..curvature.local import input_transform
from ..curvature.operator import sum_over_ranks

FIRST_STEP, LAST_STEP, MIN_STEPS, SMALLEST_STEP = 4, 19, 6, 60  # of the steps ε = 0.5^k


@dataclass
class Check:
    """One check: `error` against `tolerance`, unless `unchecked` gives the reason it cannot be
    decided here; `verdict` is "ok", "FAIL" or (then) "not checkable"."""

    name: str
    error: float
    tolerance: float
    detail: str = ""
    unchecked: str = ""

    @property
    def passed(self) -> bool:
        return not self.unchecked and bool(np.isfinite(self.error) and self.error <= self.tolerance)

    @property
    def failed(self) -> bool:
        return not self.unchecked and not self.passed

    @property
    def verdict(self) -> str:
        return "ok" if self.passed else "FAIL" if self.failed else "not checkable"


# ---------------------------------------------------------------- kinks

def _sign(x):
    tf = runtime.import_tensorflow()
    return tf.cast(tf.sign(x), tf.int8)


def _sources(op):
    """What each input element contributes to the outputs (the op's gradient of ones): for a
    pooling or a max/min reduction, which element each window takes."""
    tf = runtime.import_tensorflow()
    return tf.gradients(op.outputs[0], op.inputs[0])[0]


# TensorFlow op type → a tensor that stays the same exactly as long as the op does not
# cross a kink (a switch of its derivative or, for steps such as Floor, of its value).
# Elu and Selu are smooth but their second derivative jumps at 0, which the HVP sees.
PATTERNS = {
    **dict.fromkeys(("Relu", "LeakyRelu", "Elu", "Selu", "Abs", "Sign"), lambda op: _sign(op.inputs[0])),
    "Relu6": lambda op: _sign(op.inputs[0]) + _sign(op.inputs[0] - 6),
    **dict.fromkeys(("Maximum", "Minimum"), lambda op: _sign(op.inputs[0] - op.inputs[1])),
    "ClipByValue": lambda op: _sign(op.inputs[0] - op.inputs[1]) + _sign(op.inputs[0] - op.inputs[2]),
    **dict.fromkeys(("MaxPool", "MaxPoolV2", "MaxPool3D", "Max", "Min"), _sources),
    **dict.fromkeys(("Less", "LessEqual", "Greater", "GreaterEqual", "Floor", "Ceil", "Round"),
                    lambda op: op.outputs[0]),
}

class _Probe:
    """This rank's per-sample losses and a fingerprint of the activation pattern of each
    piecewise-linear op (`names`) of the problem's objective, at any θ.

    `hidden` lists the piecewise-linear op types inside loops or nested functions of the
    traced loss, whose patterns are out of reach."""

    def __init__(self, problem):
        tf = runtime.import_tensorflow()
        model, loss, shard = problem.model, problem.loss, problem.curvature.shard
        dtype = tf.as_dtype(model.dtype)
        inputs = input_transform(shard.pixels, dtype)  # as LocalCurvature's functions see x
        names = []

        def probe(theta, x, y):
            losses = loss.per_sample(y, model.outputs(theta, inputs(x)))
            model.penalty(theta)  # only for its kinks (L1's Abs); its value is taken in `penalty`
            ops = [op for op in tf.compat.v1.get_default_graph().get_operations()
                   if op.type in PATTERNS and op.inputs[0].dtype.is_floating]
            names[:] = [op.name for op in ops]
            return losses, [PATTERNS[op.type](op) for op in ops]

        x_spec, y_spec = shard.spec
        self.fn = tf.function(probe, input_signature=(tf.TensorSpec((model.n_params,), dtype), x_spec, y_spec))
        library = self.fn.get_concrete_function().graph.as_graph_def().library
        self.names = tuple(names)
        self.hidden = sorted({node.op for f in library.function for node in f.node_def if node.op in PATTERNS
                              and "T" in node.attr and tf.as_dtype(node.attr["T"].type).is_floating})
        self.dtype = dtype

    @classmethod
    def of(cls, problem) -> "_Probe":
        """The probe of the problem's model, loss and kind of samples (traced once per process)."""
        shard = problem.curvature.shard
        key = (problem.loss.key, shard.pixels, repr(shard.spec))
        cache = problem.model.__dict__.setdefault("_verify_probes", {})  # goes with the model
        if key not in cache:
            cache[key] = cls(problem)
        return cache[key]

    def __call__(self, shard, theta) -> tuple[np.ndarray, list[bytes]]:
        """(the per-sample losses of this rank's samples, one pattern digest per op) at θ."""
        tf = runtime.import_tensorflow()
        theta = tf.constant(theta, self.dtype)
        losses, digests = [np.zeros(0)], [hashlib.blake2b() for _ in self.names]
        for x, y in shard.batches():
            values, patterns = self.fn(theta, x, y)
            losses.append(values.numpy().astype(np.float64))
            for digest, pattern in zip(digests, patterns):
                digest.update(pattern.numpy().tobytes())
        return np.concatenate(losses), [d.digest() for d in digests]

    def penalty(self, model, theta) -> float:
        """The model's regularization terms at θ (0 without)."""
        tf = runtime.import_tensorflow()
        value = model.penalty(tf.constant(theta, self.dtype))
        return 0.0 if value is None else float(value)


@dataclass
class _Step:
    switched: tuple  # the ops whose pattern differs at θ + εd or θ − εd from θ, on any rank
    loss_difference: float  # L(θ + εd) − L(θ − εd), penalty included


class _Line:
    """The segments [θ − εd, θ + εd]: which ops switch at their ends and the loss difference
    across them, each ε evaluated once. Collective."""

    def __init__(self, problem, theta, d):
        self.problem, self.theta, self.d = problem, theta, d
        self.probe = _Probe.of(problem)
        self.losses, self.digests = self.probe(problem.curvature.shard, theta)
        self.steps: dict[float, _Step] = {}

    def step(self, eps: float) -> _Step:
        if eps not in self.steps:
            p, probe = self.problem, self.probe
            (plus, at_plus), (minus, at_minus) = (probe(p.curvature.shard, self.theta + s * eps * self.d)
                                                  for s in (1, -1))
            switched = {name for name, a, b, c in zip(probe.names, self.digests, at_plus, at_minus)
                        if not a == b == c}
            switched = tuple(sorted(set().union(*p.comm.allgather(switched))))
            # per-sample differences summed exactly: a sum of losses would be rounding noise
            # at the tiny steps that kinks leave
            total = sum_over_ranks(p.comm, math.fsum(plus - minus)) / p.n_samples
            penalty = [probe.penalty(p.model, self.theta + s * eps * self.d) for s in (1, -1)]
            self.steps[eps] = _Step(switched, total + penalty[0] - penalty[1])
        return self.steps[eps]

    def free(self, k: int) -> bool:
        """Whether no op switches at θ ± 0.5^k·d."""
        return not self.step(0.5 ** k).switched

    def mean_loss(self) -> float:
        """L(θ) from the per-sample losses, penalty included."""
        return (sum_over_ranks(self.problem.comm, math.fsum(self.losses)) / self.problem.n_samples
                + self.probe.penalty(self.problem.model, self.theta))


def switched_ops(problem, theta, d, eps: float) -> tuple[str, ...]:
    """The piecewise-linear ops of the problem's loss whose activation pattern, on some rank's
    samples, differs at θ + εd or θ − εd from θ (empty: no kink found in the segment). Collective."""
    return _Line(problem, np.asarray(theta, dtype=np.float64), d).step(eps).switched


def _resolved(problem, theta, d, tol) -> int:
    """The largest k ≤ SMALLEST_STEP for which θ ± 0.5^k·d, rounded to the compute dtype, still
    differ by 2·0.5^k·d to tol/10 (FIRST_STEP − 1 if none does)."""
    dtype = np.dtype(problem.model.dtype)
    last = FIRST_STEP - 1
    for k in range(FIRST_STEP, SMALLEST_STEP + 1):
        eps = 0.5 ** k
        step = (theta + eps * d).astype(dtype).astype(np.float64) - (theta - eps * d).astype(dtype).astype(np.float64)
        if np.linalg.norm(step - 2 * eps * d) > tol / 10 * np.linalg.norm(2 * eps * d):
            break
        last = k
    return last


def _names(ops) -> str:
    return ", ".join(ops[:3]) + (f" and {len(ops) - 3} more" if len(ops) > 3 else "")


@dataclass
class Steps:
    """The steps ε = 0.5^k of a finite-difference check (`ks`), what is known of the kinks
    (`note`), why there are no steps (`reason`), and whether kinks may hide in loops (`hidden`)."""

    ks: list
    note: str = ""
    reason: str = ""
    hidden: bool = False


def kink_free_steps(line: _Line, tol: float) -> Steps:
    """The steps resolved in the compute dtype at which no op switches at θ ± εd: 0.5^4 … 0.5^19,
    or at least MIN_STEPS steps from the largest kink-free one down, found by bisection
    (assuming that a segment without a switch at its ends holds none in a shorter one)."""
    problem, probe = line.problem, line.probe
    last = _resolved(problem, line.theta, line.d, tol)
    dtype = problem.model.dtype
    hidden = (f"; not located: {', '.join(probe.hidden)} inside loops or nested functions"
              if probe.hidden else "")
    if last < FIRST_STEP:
        return Steps([], reason=f"no step ε ≤ {0.5 ** FIRST_STEP:.1e} is resolved in {dtype} next to θ")
    if not probe.names:
        return Steps(list(range(FIRST_STEP, min(LAST_STEP, last) + 1)), "no piecewise-linear ops" + hidden,
                     hidden=bool(hidden))
    if line.free(FIRST_STEP):
        first, note = FIRST_STEP, f"no kink within |ε| ≤ {0.5 ** FIRST_STEP:.1e}"
    elif not line.free(last):
        advice = ("run with --dtype float64" if dtype == "float32"
                  else "check on fewer samples, or move θ off the kink (--perturb)")
        return Steps([], reason=f"{_names(line.step(0.5 ** last).switched)} switch(es) within ε = "
                                f"{0.5 ** last:.1e} of θ along d, the smallest step resolved in {dtype}: "
                                f"finite differences there measure the kink or rounding; {advice}")
    else:
        below, first = FIRST_STEP, last  # a switch at 0.5^below, none at 0.5^first
        while first - below > 1:
            mid = (below + first) // 2
            below, first = (below, mid) if line.free(mid) else (mid, first)
        note = (f"nearest kink ({_names(line.step(0.5 ** below).switched)}) at {0.5 ** first:.1e} < ε ≤ "
                f"{0.5 ** below:.1e}")
    candidates = range(first, min(max(LAST_STEP, first + MIN_STEPS - 1), last) + 1)
    ks = [k for k in candidates if line.free(k)]
    if len(ks) < len(candidates):
        note += f"; {len(candidates) - len(ks)} shorter step(s) crossing a kink left out"
    return Steps(ks, note + hidden, hidden=bool(hidden))


def _judge(name, problem, steps: Steps, estimates, exact, size, what) -> Check:
    """The Check of finite-difference estimates (one per step) of `exact`, errors relative to `size`."""
    tol = _tol(problem)
    if not steps.ks:
        return Check(name, float("nan"), tol, what, unchecked=steps.reason)
    errors = [float(np.linalg.norm(e - exact)) / size for e in estimates]
    best = int(np.argmin(errors))
    ks, shown = steps.ks, errors if len(errors) <= 6 else errors[::3]
    detail = (f"{what}; ε = {0.5 ** ks[best]:.1e} (best of {len(ks)}: {0.5 ** ks[0]:.1e} … {0.5 ** ks[-1]:.1e}); "
              f"{steps.note}; errors " + " ".join(f"{e:.1e}" for e in shown))
    check = Check(name, errors[best], tol, detail)
    if check.passed:
        return check
    # How well the finite differences know the derivative: the closest agreement of three
    # successive steps (of two if there are only two).
    window = min(len(estimates), 3)
    groups = [estimates[i:i + window] for i in range(len(estimates) - window + 1)] if window > 1 else []
    spread = min((max(float(np.linalg.norm(a - b)) / size for a in group for b in group) for group in groups),
                 default=float("inf"))
    if steps.hidden:
        check.unchecked = "kinks inside loops or nested functions cannot be located; finite differences may cross one"
    elif 10 * spread > check.error:
        check.unchecked = (f"finite differences agree with each other only to {spread:.1e}, too little to tell "
                           f"the error {check.error:.1e} from their own"
                           + ("; run with --dtype float64" if _single(problem) else ""))
    return check


# ---------------------------------------------------------------- the checks

def _direction(n, seed):
    d = np.random.default_rng(seed).standard_normal(n)
    return d / np.linalg.norm(d)


def _both_sides(problem, theta, step):
    """((L, ∇L) at θ + step, (L, ∇L) at θ − step); the problem is left at θ."""
    problem.set_params(theta + step)
    plus = problem.loss_grad()
    problem.set_params(theta - step)
    minus = problem.loss_grad()
    problem.set_params(theta)
    return plus, minus


def gradient_check(problem, theta, seed=0) -> Check:
    """Best relative error of (L(θ+εd) − L(θ−εd))/2ε against ∇L·d over the kink-free steps ε.

    L is recomputed from the per-sample losses (their differences summed exactly); "not
    checkable" if it differs from the problem's loss by more than the tolerance."""
    name = "gradient vs finite differences"
    d = _direction(problem.n_params, seed)
    problem.set_params(theta)
    value, g = problem.loss_grad()
    exact = float(g @ d)
    line = _Line(problem, theta, d)
    steps = kink_free_steps(line, _tol(problem))
    estimates = [line.step(0.5 ** k).loss_difference / (2 * 0.5 ** k) for k in steps.ks]
    check = _judge(name, problem, steps, estimates, exact, max(abs(exact), 1e-12), f"∇L·d = {exact:.6e}")
    recomputed = line.mean_loss()
    if abs(recomputed - value) > _tol(problem) * max(abs(value), 1e-12):
        check.unchecked = (f"the loss recomputed from per-sample losses ({recomputed:.9e}) is not the "
                           f"problem's ({value:.9e})")
    return check


def hvp_check(problem, theta, seed=1) -> Check:
    """Best relative error of (∇L(θ+εd) − ∇L(θ−εd))/2ε against H·d over the kink-free steps ε."""
    d = _direction(problem.n_params, seed)
    problem.set_params(theta)
    hd = problem.hessian.apply_full(d)
    steps = kink_free_steps(_Line(problem, theta, d), _tol(problem))
    estimates = []
    for k in steps.ks:
        (_, gp), (_, gm) = _both_sides(problem, theta, 0.5 ** k * d)
        estimates.append((gp - gm) / (2 * 0.5 ** k))
    norm = float(np.linalg.norm(hd))
    return _judge("HVP vs finite differences of the gradient", problem, steps, estimates, hd, max(norm, 1e-12),
                  f"‖Hd‖ = {norm:.6e}")


def symmetry_check(problem, theta, seed=2) -> Check:
    """2|yᵀHx − xᵀHy| / (|yᵀHx| + |xᵀHy|) for random x, y."""
    problem.set_params(theta)
    x, y = _direction(problem.n_params, seed), _direction(problem.n_params, seed + 100)
    a, b = y @ problem.hessian.apply_full(x), x @ problem.hessian.apply_full(y)
    ratio = 2 * abs(a - b) / max(abs(a) + abs(b), 1e-300)
    return Check("symmetry", ratio, 1e-5 if _single(problem) else 1e-12,
                 f"yᵀHx = {a:.6e}, xᵀHy = {b:.6e}")


def determinism_check(problem, theta, seed=3) -> Check:
    """max |Hx − Hx| / ‖Hx‖ for the same x applied twice."""
    problem.set_params(theta)
    x = _direction(problem.n_params, seed)
    first, second = problem.hessian.apply_full(x), problem.hessian.apply_full(x)
    diff = np.abs(first - second).max() / max(np.linalg.norm(first), 1e-300)
    return Check("determinism (same product twice)", diff, 0.0 if not _single(problem) else 1e-6)


def _single(problem) -> bool:
    return problem.curvature.dtype.name == "float32"


def _tol(problem) -> float:
    return 1e-2 if _single(problem) else 1e-6


def perturbed(theta, perturb, seed=0):
    """θ moved by perturb·(‖θ‖/√n or 1)·N(0, I): off the kinks of piecewise-linear layers."""
    n = theta.size
    scale = np.linalg.norm(theta) / np.sqrt(n) or 1.0
    return theta + perturb * scale * np.random.default_rng(seed + 1000).standard_normal(n)


def run_all(problem, theta, seed=0, perturb=1e-2) -> list[Check]:
    """Every check, in order, at perturbed(θ)."""
    theta = perturbed(theta, perturb, seed)
    return [gradient_check(problem, theta, seed), hvp_check(problem, theta, seed + 1),
            symmetry_check(problem, theta, seed + 2), determinism_check(problem, theta, seed + 3)]


def verify(op, seed: int = 0, perturb: float = 1e-2) -> list[Check]:
    """run_all on the problem of a Hessian operator (hessmpi.Hessian, all of θ), at its θ;
    HessmpiError for another operator, whose checks these are not. Collective."""
    from ..errors import HessmpiError

    problem = op.problem
    if problem is None or op is not problem.hessian:
        raise HessmpiError("verify checks a problem's Hessian over all parameters (hessmpi.Hessian without layer=; "
                           "the finite differences are those of the gradient)")
    theta = problem.theta.copy()
    try:
        return run_all(problem, theta, seed, perturb)
    finally:
        problem.set_params(theta)
