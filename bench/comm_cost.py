#!/usr/bin/env python3
"""Compute against communication per Hessian-vector product at 1, 2, 4, 8 ranks, and a scaling estimate to 1,024.

    python bench/comm_cost.py [--ranks 1,2,4,8] [--n-samples 2000] [--models softmax,cnn] [--json FILE]
    python bench/comm_cost.py --from-json FILE --alpha 50e-6 --beta 1.25e9   # re-project for another network

For each model and rank count it launches `mpirun -n P` workers that apply the
distributed Hessian (hessmpi.Hessian, a hessmpi.curvature.DistributedOperator, which times its local
HVPs and its Allgatherv + Reduce_scatter separately) to random vectors, and time the
two collectives alone on an n-vector. One rank then times the local HVP on m samples
(one TensorFlow thread, best of --repeat) for several m and fits t(m) = a + b·m in
relative error: a is the fixed cost of a TensorFlow call. The projection for
P ranks, one core each, on full MNIST (60,000 samples) is

    compute(P) = a·⌈m/M⌉ + b·m  with m = ⌈60,000/P⌉ samples per rank, M = --micro-batch
    comm(P)    = 2·(L·α + (P−1)/P · 8n/β)     one Allgatherv and one Reduce_scatter of n doubles
                 + 2·⌈log₂P⌉·α                 SLEPc's two orthogonalization Allreduces

with network latency α and bandwidth β (--alpha, --beta; the defaults are a
100 Gb/s InfiniBand fabric) and L = ⌈log₂P⌉ message steps for tree algorithms or
P−1 for the ring algorithms MPI libraries pick for large vectors; the table shows
both, and its share, speed-up and efficiency use the ring (the pessimistic one). Prints Markdown tables. Ranks beyond this machine's
cores share them: the measured compute per rank at 4 and 8 ranks here is inflated.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"softmax": "float64", "cnn": "float32"}  # the precision each model is usually analysed in
FULL_MNIST = 60_000


def worker(args):
    """One mpirun rank: per-product compute and communication, and the collectives alone."""
    from hessmpi import runtime

    runtime.init_petsc()
    runtime.configure_threads(1)
    from mpi4py import MPI

    import hessmpi
    from hessmpi.curvature.petsc import shell_matrix
    from hessmpi.models import builtin

    comm = MPI.COMM_WORLD
    n_params = builtin.layout(args.model).n_params
    rng = np.random.default_rng(0)
    theta = builtin.init(args.model, 0) + 0.01 * rng.standard_normal(n_params)
    op = hessmpi.Hessian(args.model, "mnist-5k", dtype=args.dtype, n_samples=args.n_samples, comm=comm,
                         micro_batch=args.micro_batch, params=theta)
    problem = op.problem
    mat = shell_matrix(op)  # the products go through PETSc, as in a solve
    x, y = mat.createVecs()
    vectors = rng.standard_normal((args.repeat + 2, n_params))
    for v in vectors[:2]:  # trace and warm up
        x.getArray()[:] = v[op.lo:op.hi]
        mat.mult(x, y)
    comm.Barrier()
    c0, m0, wall = op.compute_seconds, op.comm_seconds, 0.0
    for v in vectors[2:]:
        x.getArray()[:] = v[op.lo:op.hi]
        t0 = time.perf_counter()
        mat.mult(x, y)
        wall += time.perf_counter() - t0
    comm.Barrier()
    wall /= args.repeat
    compute = (op.compute_seconds - c0) / args.repeat
    waiting = (op.comm_seconds - m0) / args.repeat

    # the two collectives alone, on the same buffers, without compute in between
    x, prod, y = vectors[0][op.lo:op.hi].copy(), vectors[1].copy(), np.empty(op.n_local)
    reps = 20
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        op.gather(x)
        comm.Reduce_scatter(prod, y, recvcounts=op.counts, op=MPI.SUM)
    collectives = (time.perf_counter() - t0) / reps

    mat.destroy()
    rows = comm.gather((compute, waiting, collectives, wall))
    if comm.Get_rank() == 0:
        rows = np.array(rows)
        print("RESULT " + json.dumps({
            "model": args.model, "dtype": args.dtype, "ranks": comm.Get_size(), "n_samples": problem.n_samples,
            "n_params": n_params, "compute_max": rows[:, 0].max(), "compute_mean": rows[:, 0].mean(),
            "comm_mean": rows[:, 1].mean(), "collectives": rows[:, 2].max(), "wall": rows[:, 3].max(),
            "overhead": rows[:, 3].max() - rows[:, 0].max()}),
            flush=True)


def fit_worker(args):
    """One process, one thread: the local HVP time on m samples, for several m; fit a + b·m."""
    from hessmpi import runtime

    runtime.configure_threads(1)
    from mpi4py import MPI

    from hessmpi.curvature import Problem
    from hessmpi.data import datasets
    from hessmpi.models import builtin, resolve

    model = builtin.build(args.model, args.dtype)  # one model: its HVP is traced once for every m
    loss = resolve(None, model.source)
    digits = datasets.load("mnist-5k").split("train", args.micro_batch)
    rng = np.random.default_rng(0)
    theta = builtin.init(args.model, 0) + 0.01 * rng.standard_normal(model.n_params)
    v = rng.standard_normal(model.n_params)
    sizes = [args.micro_batch // 2 ** k for k in range(6)]
    times = []
    for m in sizes:
        # this rank's curvature as Problem builds it (uint8 pixels), on the first m digits
        curv = Problem(model, loss, digits.rows(0, m), MPI.COMM_SELF, args.micro_batch, theta=theta).curvature
        curv.hvp(v)
        best = math.inf
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            curv.hvp(v)
            best = min(best, time.perf_counter() - t0)
        times.append(best)
    # relative residuals: the small batches, where the per-call cost a shows, weigh as much as the large
    b, a = np.polyfit(sizes, times, 1, w=1.0 / np.array(times))
    print("RESULT " + json.dumps({"model": args.model, "dtype": args.dtype, "sizes": sizes, "times": times,
                                  "a": max(a, 0.0), "b": b}), flush=True)


def launch(nprocs, flags):
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_mpi_yield_when_idle": "1",
           "HESSMPI_TF_THREADS": "1"}
    cmd = ["mpirun", "-n", str(nprocs), sys.executable, os.path.abspath(__file__), *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def projected(fit, n_params, ranks, alpha, beta, micro_batch, n_total=FULL_MNIST):
    """(samples per rank, compute, comm with tree latency, comm with ring latency) of one product."""
    m = math.ceil(n_total / ranks)
    compute = fit["a"] * math.ceil(m / micro_batch) + fit["b"] * m
    hops = math.ceil(math.log2(ranks)) if ranks > 1 else 0
    volume = 2 * (ranks - 1) / ranks * 8 * n_params / beta + 2 * hops * alpha
    return m, compute, volume + 2 * hops * alpha, volume + 2 * (ranks - 1) * alpha


def ms(seconds):
    return f"{1e3 * seconds:.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2,8")
    p.add_argument("--models", default="softmax,cnn")
    p.add_argument("--n-samples", type=int, default=4000,
                   help="samples in all (mnist-5k has 4,000 training digits)")
    p.add_argument("--repeat", type=int, default=3, help="products timed per measurement")
    p.add_argument("--micro-batch", type=int, default=1000)
    p.add_argument("--alpha", type=float, default=2e-6, help="network latency per message hop (s)")
    p.add_argument("--beta", type=float, default=10e9, help="network bandwidth per rank (bytes/s)")
    p.add_argument("--json", default=None, help="also write the measurements and projections to this file")
    p.add_argument("--from-json", default=None, help="project from the measurements in this file (of --json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fit", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return fit_worker(args) if args.fit else worker(args)

    if args.from_json:
        with open(args.from_json) as fh:
            saved = json.load(fh)
        measured, fits = saved["measured"], saved["fits"]
    else:
        common = ["--n-samples", str(args.n_samples), "--repeat", str(args.repeat),
                  "--micro-batch", str(args.micro_batch)]
        measured, fits = [], {}
        for model in args.models.split(","):
            flags = ["--worker", "--model", model, "--dtype", DTYPES[model], *common]
            for nprocs in map(int, args.ranks.split(",")):
                measured.append(launch(nprocs, flags))
                print(f"  measured {model} on {nprocs} rank(s)", file=sys.stderr, flush=True)
            fits[model] = launch(1, flags + ["--fit"])

    print(f"\nPer Hessian-vector product on {measured[0]['n_samples']:,} MNIST digits, this machine "
          f"({os.cpu_count()} cores, 1 TensorFlow thread per rank, mean of {args.repeat} products)\n")
    print("| model | dtype | ranks | matvec (ms) | local HVP (ms, slowest rank) | overhead (ms) | overhead share "
          "| communication (ms) | of which the collectives alone (ms) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in measured:
        print(f"| {r['model']} | {r['dtype']} | {r['ranks']} | {ms(r['wall'])} | {ms(r['compute_max'])} "
              f"| {ms(r['overhead'])} | {r['overhead'] / r['wall']:.1%} | {ms(r['comm_mean'])} "
              f"| {ms(r['collectives'])} |")
    print("\nmatvec: PETSc MatMult of the shell matrix (slowest rank); overhead = matvec − the slowest rank's "
          "local HVP: gather, reduce-scatter, PETSc and NumPy/TensorFlow conversions. Communication is the "
          "mean rank's time inside Allgatherv + Reduce_scatter, waiting for the slowest rank included; "
          "the collectives alone are timed back to back without compute.")

    print("\nLocal HVP on m samples, one rank, one thread: fit t(m) = a + b·m\n")
    print("| model | dtype | " + " | ".join(f"m = {m}" for m in fits[next(iter(fits))]["sizes"]) + " | a (ms) | b (µs/sample) |")
    print("|---|---|" + "---:|" * (len(fits[next(iter(fits))]["sizes"]) + 2))
    for f in fits.values():
        print(f"| {f['model']} | {f['dtype']} | " + " | ".join(ms(t) for t in f["times"])
              + f" | {ms(f['a'])} | {1e6 * f['b']:.1f} |")

    print(f"\nProjected per product on full MNIST ({FULL_MNIST:,} samples), one core per rank, "
          f"α = {args.alpha * 1e6:g} µs, β = {args.beta / 1e9:g} GB/s\n")
    print("| model | ranks | samples / rank | compute (ms) | comm, tree (ms) | comm, ring (ms) "
          "| comm share | speed-up over 8 ranks | efficiency vs 8 ranks |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    projections = []
    for model, f in fits.items():
        n_params = next(r["n_params"] for r in measured if r["model"] == model)
        _, compute8, _, ring8 = projected(f, n_params, 8, args.alpha, args.beta, args.micro_batch)
        for ranks in (8, 16, 32, 64, 128, 256, 512, 1024):
            m, compute, tree, ring = projected(f, n_params, ranks, args.alpha, args.beta, args.micro_batch)
            speedup = (compute8 + ring8) / (compute + ring)
            projections.append(dict(model=model, ranks=ranks, samples=m, compute=compute, comm_tree=tree,
                                    comm_ring=ring))
            print(f"| {model} | {ranks} | {m:,} | {ms(compute)} | {ms(tree)} | {ms(ring)} "
                  f"| {ring / (compute + ring):.1%} | {speedup:.1f} | {speedup * 8 / ranks:.0%} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"measured": measured, "fits": fits, "projections": projections,
                       "alpha": args.alpha, "beta": args.beta}, fh, indent=1)


if __name__ == "__main__":
    main()
