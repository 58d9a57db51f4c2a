#!/usr/bin/env python3
"""Cost of one gradient and one Hessian-vector product on one rank, per model, dtype and HVP mode.

    python bench/hvp_cost.py [--samples 1000,4000] [--modes reverse-over-reverse,forward-over-reverse]
                             [--skip cnn:float64:4000] [--repeat 5] [--threads T] [--json FILE]
    python bench/hvp_cost.py --compare-handwritten [--samples 1000] [--dtypes float32,float64]
                             [--repeat 5] [--budget 20] [--threads T] [--json FILE]

Prints a Markdown table: seconds per gradient, per HVP, and their ratio (the
theoretical floor of an HVP is about 2 gradients), and how often the HVP function was
traced (1: no retracing). Real MNIST digits (mnist-5k, whose training split has 4,000
digits: "5,000 samples" is measured as 4,000). Same process, same micro-batches
(--micro-batch), one rank, the shard given as hessmpi.curvature.Problem gives it (uint8).

--compare-handwritten instead times the generic path (the built-in Keras model through
hessmpi.curvature.LocalCurvature) against the former hand-written model and HVP
(bench/handwritten.py, frozen), interleaved A, B, A, B on the same θ, digits,
micro-batches and threads: at least --repeat pairs, more while a row's pairs add up to
under --budget seconds (default 20 s there, 1 s for the gradient/HVP table). Its table
gives the seconds per HVP of each (best, median), the median of the per-pair ratios
generic / hand-written (the project keeps the generic path if it is ≤ 1.05), and the
relative differences ‖a − b‖/‖b‖ of the two HVPs and gradients (rounding: ~1e-7 in
float32, ~1e-14 in float64). Its default sizes: both models, both dtypes, 1,000 digits.
"""

import argparse
import json
import sys
import time

import numpy as np

from hessmpi import runtime


def paired_times(grad, hvp, repeat, budget=1.0):
    """(best gradient time, best HVP time, median of the per-pair ratios) over at least
    `repeat` back-to-back (gradient, HVP) pairs, more while they add up to under `budget`
    s. Pairing makes the ratio robust to a machine whose speed drifts during the run."""
    grad(), hvp()  # trace and warm up
    tg, th = interleaved(grad, hvp, repeat, budget)
    return tg.min(), th.min(), float(np.median(th / tg))


def interleaved(a, b, repeat, budget):
    """(times of a, times of b) over at least `repeat` interleaved pairs a, b, a, b, …, more
    while they add up to under `budget` s; a and b have been warmed up by the caller."""
    ta, tb = [], []
    while len(ta) < repeat or sum(ta) + sum(tb) < budget:
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        ta.append(t1 - t0)
        tb.append(time.perf_counter() - t1)
    return np.array(ta), np.array(tb)


def rel_diff(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def curvature(model, samples, micro_batch, mode, theta):
    """The LocalCurvature of `model` on all of `samples`, one rank, as hessmpi.curvature.Problem
    builds it (uint8 pixels in micro-batches), at θ."""
    from mpi4py import MPI

    from hessmpi.curvature import Problem
    from hessmpi.models import resolve

    problem = Problem(model, resolve(None, model.source), samples, MPI.COMM_SELF, micro_batch, mode, theta)
    return problem.curvature


def point(name, n_params):
    """θ (the initialisation of seed 0, perturbed) and the vector v of every row of a model."""
    from hessmpi.models import builtin

    theta = builtin.init(name, 0) + 0.01 * np.random.default_rng(0).standard_normal(n_params)
    v = np.random.default_rng(1).standard_normal(n_params)
    return theta, v


def cost_table(args, ds, threads):
    from hessmpi.models import builtin

    samples = args.samples or "1000,4000"
    skip = set(args.skip.split(",")) if args.skip else set()
    rows = []
    for name in args.models.split(","):
        theta, v = point(name, builtin.layout(name).n_params)
        for dtype in ("float32", "float64"):
            model = builtin.build(name, dtype)  # one per dtype: its functions are traced once for every n
            for n in map(int, samples.split(",")):
                if f"{name}:{dtype}:{n}" in skip:
                    continue
                for mode in args.modes.split(","):
                    c = curvature(model, ds.split("train", n), args.micro_batch, mode, theta)
                    tg, th, ratio = paired_times(c.loss_grad, lambda: c.hvp(v), args.repeat, args.budget or 1.0)
                    rows.append(dict(model=name, dtype=dtype, mode=mode, n_samples=n,
                                     threads=threads, grad_s=tg, hvp_s=th, ratio=ratio,
                                     traces=c.tracing_count()))
                    print(f"  {name} {dtype} {n} {mode}: {ratio:.2f}", file=sys.stderr, flush=True)
    print(f"\nOne gradient and one HVP in the same process, mnist-5k digits, 1 rank, {threads} TF thread(s), "
          f"micro-batch {args.micro_batch}, best time and median ratio of ≥ {args.repeat} back-to-back pairs\n")
    print("| model | dtype | samples | HVP mode | gradient (s) | HVP (s) | HVP / gradient | HVP traces |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['n_samples']:,} | {r['mode']} | {r['grad_s']:.4f} "
              f"| {r['hvp_s']:.4f} | {r['ratio']:.2f} | {r['traces']} |")
    return rows


def compare_table(args, ds, threads):
    """The generic Keras path against the frozen hand-written HVP (bench/handwritten.py)."""
    import handwritten

    from hessmpi.models import builtin

    samples = args.samples or "1000"
    budget = 20.0 if args.budget is None else args.budget
    rows = []
    for name in args.models.split(","):
        reference = handwritten.get_model(name)
        lay = builtin.layout(name)
        if [t.shape for t in reference.layout] != [t.shape for t in lay]:
            raise SystemExit(f"{name}: the hand-written θ layout differs from the built-in model's")
        theta, v = point(name, lay.n_params)
        for dtype in args.dtypes.split(","):
            model = builtin.build(name, dtype)
            for n in map(int, samples.split(",")):
                for mode in args.modes.split(","):
                    generic = curvature(model, ds.split("train", n), args.micro_batch, mode, theta)
                    hand = handwritten.Curvature(reference, dtype, generic.shard, mode)  # the same micro-batches
                    hand.set_params(theta)
                    (lg, gg), (lh, gh) = generic.loss_grad(), hand.loss_grad()
                    hg, hh = generic.hvp(v), hand.hvp(v)  # traced, warmed up
                    hg, hh = generic.hvp(v), hand.hvp(v)
                    ta, tb = interleaved(lambda: generic.hvp(v), lambda: hand.hvp(v), args.repeat, budget)
                    row = dict(model=name, dtype=dtype, mode=mode, n_samples=n, threads=threads,
                               micro_batch=args.micro_batch, pairs=len(ta),
                               generic_best_s=float(ta.min()), generic_median_s=float(np.median(ta)),
                               handwritten_best_s=float(tb.min()), handwritten_median_s=float(np.median(tb)),
                               ratio_median=float(np.median(ta / tb)), ratio_min=float((ta / tb).min()),
                               ratio_max=float((ta / tb).max()), hvp_rel_diff=rel_diff(hg, hh),
                               grad_rel_diff=rel_diff(gg, gh), loss_rel_diff=abs(lg - lh) / abs(lh),
                               traces=[generic.tracing_count(), hand.tracing_count()],
                               generic_s=ta.tolist(), handwritten_s=tb.tolist())
                    rows.append(row)
                    print(f"  {name} {dtype} {n} {mode}: generic / hand-written {row['ratio_median']:.3f} "
                          f"over {len(ta)} pairs", file=sys.stderr, flush=True)
    print(f"\nHVP of the generic Keras path (LocalCurvature) against the former hand-written one "
          f"(bench/handwritten.py), same process, θ, mnist-5k digits and micro-batches (micro-batch "
          f"{args.micro_batch}), 1 rank, {threads} TF thread(s); ≥ {args.repeat} interleaved pairs, more "
          f"within {budget:g} s per row\n")
    print("| model | dtype | samples | HVP mode | pairs | generic best (s) | generic median (s) "
          "| hand-written best (s) | hand-written median (s) | generic / hand-written (median of pairs) "
          "| HVP rel. diff. | gradient rel. diff. |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['n_samples']:,} | {r['mode']} | {r['pairs']} "
              f"| {r['generic_best_s']:.4f} | {r['generic_median_s']:.4f} | {r['handwritten_best_s']:.4f} "
              f"| {r['handwritten_median_s']:.4f} | **{r['ratio_median']:.3f}** | {r['hvp_rel_diff']:.1e} "
              f"| {r['grad_rel_diff']:.1e} |")
    print("\nratio: median over the pairs of (generic HVP time) / (hand-written HVP time), each pair run back "
          "to back; ≤ 1.05 keeps the generic path. rel. diff.: ‖generic − hand-written‖ / ‖hand-written‖.")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", default=None, help="default 1000,4000 (--compare-handwritten: 1000)")
    p.add_argument("--modes", default="reverse-over-reverse")
    p.add_argument("--skip", default="cnn:float64:4000", help="model:dtype:samples to leave out (slow)")
    p.add_argument("--micro-batch", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--budget", type=float, default=None,
                   help="seconds a row's timing loop may take beyond --repeat pairs (default 1; "
                        "--compare-handwritten: 20)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--models", default="softmax,cnn")
    p.add_argument("--compare-handwritten", action="store_true",
                   help="time the generic Keras HVP against the former hand-written one (bench/handwritten.py)")
    p.add_argument("--dtypes", default="float32,float64", help="--compare-handwritten only")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    threads = runtime.configure_threads(args.threads or runtime.default_threads(runtime.world()))
    from hessmpi.data import datasets

    ds = datasets.load("mnist-5k")
    rows = (compare_table if args.compare_handwritten else cost_table)(args, ds, threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
