#!/usr/bin/env python3
"""Peak memory of one rank against the size of its shard.

    python bench/memory.py [--samples 1000,4000,15000,60000] [--models cnn,softmax] [--dtype float32] [--json FILE]

Each point runs in a fresh process (one rank, one TensorFlow thread): it builds the
built-in Keras model and the hessmpi.curvature.Problem of it on the first S samples of the
synthetic dataset (seven-segment digits generated once with the largest S and read back
S rows only; mnist-5k has only 4,000), applies the Hessian to a vector and computes one
gradient, then reports the process's peak resident set size (ru_maxrss) and its resident
size before the data were loaded (the model built). Micro-batching
(--micro-batch, default 1000) bounds the activations; what may still grow with S is
the shard itself. Prints a Markdown table, with each peak relative to the smallest shard's.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(model_name, n, dtype, micro_batch, digits_dir):
    import resource

    import numpy as np

    from hessmpi import runtime

    runtime.configure_threads(1)
    from hessmpi.curvature import Problem
    from hessmpi.data import datasets
    from hessmpi.models import builtin, resolve

    comm = runtime.world()
    model = builtin.build(model_name, dtype)
    base = rss_mb()
    # the first n digits, generated once by the parent; only these n rows are read (np.load of
    # an .npz would read the whole array, whose largest size would then count in every row)
    side = datasets.IMAGE_SHAPE
    images = np.fromfile(os.path.join(digits_dir, "images.u8"), np.uint8, count=n * side[0] * side[1])
    images = images.reshape(n, *side)
    labels = np.fromfile(os.path.join(digits_dir, "labels.i8"), np.int64, count=n)
    dataset = datasets.Dataset("synthetic", images, labels, images[:10], labels[:10])
    problem = Problem(model, resolve(None, model.source), dataset.split("train", n), comm, micro_batch,
                      theta=builtin.init(model_name, 0))
    v = np.random.default_rng(0).standard_normal(model.n_params)
    problem.hessian.apply(v)
    problem.loss_grad()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(model=model_name, n_samples=n, dtype=dtype, micro_batch=micro_batch,
                          base_mb=base, peak_mb=peak, end_mb=rss_mb())))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", default="1000,15000,60000")
    p.add_argument("--models", default="cnn,softmax")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--micro-batch", type=int, default=1000)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]), args.dtype, args.micro_batch, args.worker[2])
    import numpy as np

    from hessmpi.data import datasets

    sizes = [int(s) for s in args.samples.split(",")]
    digits = datasets._synthetic(0, n_train=max(sizes), n_test=10)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        digits.train_images.tofile(os.path.join(tmp, "images.u8"))
        np.asarray(digits.train_labels, dtype=np.int64).tofile(os.path.join(tmp, "labels.i8"))
        for name in args.models.split(","):
            for n in sizes:
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name, str(n), tmp,
                                      "--dtype", args.dtype, "--micro-batch", str(args.micro_batch)],
                                     check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"\nPeak memory of one rank (ru_maxrss) against its shard, {args.dtype}, micro-batch "
          f"{args.micro_batch}, synthetic digits, 1 TensorFlow thread\n")
    print("| model | samples in the shard | RSS before data (MB) | peak RSS (MB) | peak / smallest shard's |")
    print("|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        mine = [r for r in rows if r["model"] == name]
        for r in mine:
            print(f"| {name} | {r['n_samples']:,} | {r['base_mb']:.0f} | {r['peak_mb']:.0f} | "
                  f"{r['peak_mb'] / mine[0]['peak_mb']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
