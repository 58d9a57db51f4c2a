#!/usr/bin/env python3
"""Cost of one gradient and one Hessian-vector product on one rank, per model, dtype and HVP mode.

    python bench/hvp_cost.py [--samples 1000,4000] [--modes reverse-over-reverse,forward-over-reverse]
                             [--skip cnn:float64:4000] [--repeat 5] [--threads T] [--json FILE]

Prints a Markdown table: seconds per gradient, per HVP, and their ratio (the
theoretical floor of an HVP is about 2 gradients), and how often the HVP function was
traced (1: no retracing). Real MNIST digits (mnist-5k, whose training split has 4,000
digits: "5,000 samples" is measured as 4,000). Same process, same micro-batches
(--micro-batch), one rank, the shard given as hessmpi.problem.Problem gives it (uint8).
"""

import argparse
import json
import sys
import time

import numpy as np

from hessmpi import data, runtime


def paired_times(grad, hvp, repeat, budget=1.0):
    """(best gradient time, best HVP time, median of the per-pair ratios) over at least
    `repeat` back-to-back (gradient, HVP) pairs, more while they add up to under `budget`
    s. Pairing makes the ratio robust to a machine whose speed drifts during the run."""
    grad(), hvp()  # trace and warm up
    tg, th = [], []
    while len(tg) < repeat or sum(tg) + sum(th) < budget:
        t = time.perf_counter()
        grad()
        t1 = time.perf_counter()
        hvp()
        tg.append(t1 - t)
        th.append(time.perf_counter() - t1)
    return min(tg), min(th), float(np.median(np.array(th) / np.array(tg)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", default="1000,4000")
    p.add_argument("--modes", default="reverse-over-reverse")
    p.add_argument("--skip", default="cnn:float64:4000", help="model:dtype:samples to leave out (slow)")
    p.add_argument("--micro-batch", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--models", default="softmax,cnn")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    threads = runtime.configure_threads(args.threads or runtime.default_threads(runtime.world()))
    from hessmpi.curvature import LocalCurvature
    from hessmpi.models import get_model

    ds = data.load("mnist-5k")
    skip = set(args.skip.split(",")) if args.skip else set()
    rows = []
    for name in args.models.split(","):
        model = get_model(name)
        theta = model.init(0) + 0.01 * np.random.default_rng(0).standard_normal(model.n_params)
        v = np.random.default_rng(1).standard_normal(model.n_params)
        for dtype in ("float32", "float64"):
            for n in map(int, args.samples.split(",")):
                if f"{name}:{dtype}:{n}" in skip:
                    continue
                x, y = ds.train_images[:n], np.array(ds.train_labels[:n])
                for mode in args.modes.split(","):
                    c = LocalCurvature(model, x, y, dtype, micro_batch=args.micro_batch, hvp_mode=mode)
                    c.set_params(theta)
                    tg, th, ratio = paired_times(c.loss_grad, lambda: c.hvp(v), args.repeat)
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
