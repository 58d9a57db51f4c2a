#!/usr/bin/env python3
"""What hessmpi.keras.HessianMonitor adds to the wall time of model.fit.

    python bench/monitor_cost.py [--train mnist-5k] [--epochs 3] [--pairs 3] [--eval 256,1000] [--json FILE]

The built-in CNN (86,282 parameters, float32, Keras' Adam, batch 32) is trained on the
4,000 bundled MNIST training digits (mnist-5k; or the 60,000 Fashion-MNIST images with
--train fashion-mnist, where an epoch is 15 times longer) for --epochs epochs, from the same
initialisation, without and with a monitor that records once before training and after
every epoch. Runs alternate (without, with, without, with, …) so that both see the same
machine. Settings: 'top1+trace' is the top eigenvalue (tolerance 1e-3, warm-started) and a
12-product Hutch++ trace; 'all' adds the mass below zero (2 probes × 20 Lanczos steps).
The evaluation sets are the first E test images. Prints a Markdown table: the overhead is
the median over pairs of (with − without) / without, and the monitor's own share is its
recorded time over the training time it recorded.
"""

import argparse
import json
import statistics
import time

SETTINGS = {"top1+trace": dict(top=1, trace_products=12, mass_probes=0),
            "all": dict(top=1, trace_products=12, mass_probes=2, mass_steps=20)}


def fit_seconds(train, monitor, epochs: int) -> float:
    import keras

    from hessmpi.models import builtin

    model = builtin.build("cnn", "float32", seed=0).keras
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    keras.utils.set_random_seed(0)
    t0 = time.perf_counter()
    model.fit(*train, batch_size=32, epochs=epochs, verbose=0, callbacks=[monitor] if monitor else [])
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", default="mnist-5k", choices=["mnist-5k", "fashion-mnist"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--eval", default="256,1000", help="evaluation set sizes (test digits)")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from hessmpi import runtime

    runtime.configure_threads(args.threads)
    import hessmpi
    from hessmpi.keras import HessianMonitor

    train_set = hessmpi.load_dataset(args.train)
    test_set = hessmpi.load_dataset(args.train, "test")
    train = (train_set.x.astype("float32") / 255, train_set.y)
    fit_seconds(train, None, 1)  # TensorFlow's tracing and start-up, paid once, outside the pairs
    rows = []
    for n_eval in [int(s) for s in args.eval.split(",")]:
        evaluation = (test_set.x[:n_eval].astype("float32") / 255, test_set.y[:n_eval])
        for name in args.settings.split(","):
            plain, monitored, shares, products = [], [], [], []
            for _ in range(args.pairs):
                plain.append(fit_seconds(train, None, args.epochs))
                monitor = HessianMonitor(evaluation, log=lambda line: None, **SETTINGS[name])
                monitored.append(fit_seconds(train, monitor, args.epochs))
                d = monitor.datasets
                shares.append(d["monitor/monitor_time"][-1] / d["monitor/train_time"][-1])
                products.append(int(d["monitor/n_matvecs"].sum()))
            overheads = [w / wo - 1 for w, wo in zip(monitored, plain)]
            rows.append(dict(train=args.train, eval_samples=n_eval, settings=name, epochs=args.epochs,
                             pairs=args.pairs,
                             fit_seconds=statistics.median(plain), monitored_seconds=statistics.median(monitored),
                             overhead=statistics.median(overheads), overhead_min=min(overheads),
                             overhead_max=max(overheads), monitor_share=statistics.median(shares),
                             products_per_record=statistics.median(products) / (args.epochs + 1)))
            r = rows[-1]
            print(f"# {n_eval} eval samples, {name}: {r['overhead']:.0%} "
                  f"({r['fit_seconds']:.1f} s → {r['monitored_seconds']:.1f} s)", flush=True)
    print(f"\nHessianMonitor on the CNN, float32, {args.train}: {len(train[1]):,} images × {args.epochs} epochs, "
          f"batch 32, "
          f"{args.threads} threads, records before training and after every epoch\n")
    print("| eval samples | records | products / record | fit alone (s) | fit + monitor (s) "
          "| overhead (median, min–max of pairs) | monitor time / training time |")
    print("|---:|---|---:|---:|---:|---|---:|")
    for r in rows:
        spread = f"{r['overhead_min']:.0%}–{r['overhead_max']:.0%}"
        print(f"| {r['eval_samples']:,} | {r['settings']} | {r['products_per_record']:.0f} | {r['fit_seconds']:.2f} "
              f"| {r['monitored_seconds']:.2f} | {r['overhead']:.0%} ({spread}) | {r['monitor_share']:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
