#!/usr/bin/env python3
"""Cost of one gradient and one Hessian-vector product on one rank, per model, dtype and HVP mode.

    python bench/hvp_cost.py [--samples 1000,4000] [--modes reverse-over-reverse,forward-over-reverse]
                             [--skip cnn:float64:4000] [--repeat 2] [--json FILE]

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


def best_time(fn, repeat, budget=0.5):
    """The best of at least `repeat` timed calls, more while they add up to under `budget` s."""
    fn()  # trace and warm up
    times = []
    while len(times) < repeat or sum(times) < budget:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", default="1000,4000")
    p.add_argument("--modes", default="reverse-over-reverse")
    p.add_argument("--skip", default="cnn:float64:4000", help="model:dtype:samples to leave out (slow)")
    p.add_argument("--micro-batch", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=2)
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
                    tg = best_time(c.loss_grad, args.repeat)
                    th = best_time(lambda: c.hvp(v), args.repeat)
                    rows.append(dict(model=name, dtype=dtype, mode=mode, n_samples=n,
                                     threads=threads, grad_s=tg, hvp_s=th, ratio=th / tg,
                                     traces=c.tracing_count()))
                    print(f"  {name} {dtype} {n} {mode}: {th / tg:.2f}", file=sys.stderr, flush=True)
    print(f"\nOne gradient and one HVP in the same process, mnist-5k digits, 1 rank, {threads} TF thread(s), "
          f"micro-batch {args.micro_batch}, best of {args.repeat}\n")
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
