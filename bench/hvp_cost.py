#!/usr/bin/env python3
"""Cost of one gradient and one Hessian-vector product on one rank, per model, dtype and HVP mode.

    python bench/hvp_cost.py [--n-samples 1000] [--repeat 3] [--json FILE]

Prints a Markdown table: seconds per gradient, per HVP, and their ratio (the
theoretical floor of an HVP is about 2 gradients). Real MNIST digits (mnist-5k).
"""

import argparse
import json
import time

import numpy as np

from hessmpi import data, runtime


def best_time(fn, repeat):
    fn()  # trace and warm up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--models", default="softmax,cnn")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    threads = runtime.configure_threads(args.threads or runtime.default_threads(runtime.world()))
    from hessmpi.curvature import HVP_MODES, LocalCurvature
    from hessmpi.models import get_model

    x, y = data.select(data.load("mnist-5k"), args.n_samples, 1, 0)
    rows = []
    for name in args.models.split(","):
        model = get_model(name)
        theta = model.init(0) + 0.01 * np.random.default_rng(0).standard_normal(model.n_params)
        v = np.random.default_rng(1).standard_normal(model.n_params)
        for dtype in ("float32", "float64"):
            for mode in HVP_MODES:
                c = LocalCurvature(model, x, y, dtype, micro_batch=1000, hvp_mode=mode)
                c.set_params(theta)
                tg = best_time(c.loss_grad, args.repeat)
                th = best_time(lambda: c.hvp(v), args.repeat)
                rows.append(dict(model=name, dtype=dtype, mode=mode, n_samples=args.n_samples,
                                 threads=threads, grad_s=tg, hvp_s=th, ratio=th / tg,
                                 traces=c.tracing_count()))
    print(f"\nOne gradient and one HVP on {args.n_samples} MNIST digits, 1 rank, {threads} TF thread(s), "
          f"best of {args.repeat}\n")
    print("| model | dtype | HVP mode | gradient (s) | HVP (s) | HVP / gradient |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['mode']} | {r['grad_s']:.4f} | {r['hvp_s']:.4f} | {r['ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
