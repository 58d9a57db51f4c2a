#!/usr/bin/env python3
"""The PyTorch references: PyHessian, hessian-eigenthings and ARPACK on the same model, data and θ.

    python bench/pyhessian_ref.py --torch-python PY [--model cnn] [--n-samples 1000]
    python bench/pyhessian_ref.py --torch-python PY --whole-process 3 [--model softmax --n-samples 4000 --dtype float64]

hessmpi does not depend on PyTorch. This script writes the samples and θ (from the
hessmpi environment) to a temporary .npz and runs itself under --torch-python (a
Python with `torch`, `pyhessian`, `hessian_eigenthings` and `scipy` installed, e.g. a
throw-away venv; default: $HESSMPI_TORCH_PYTHON). There it builds the model of
DESIGN.md in PyTorch with the same weights (the CNN's flatten in Keras' HWC order, so
the function is the same; the softmax regression as a bias-free Linear), times one
gradient and one HVP and runs, counting their products:
- `pyhessian.hessian(...).eigenvalues(top_n=k)` on the whole shard as one batch
  (PyHessian's defaults: tol 1e-3 on the change of the Rayleigh quotient, at most 100
  products per eigenvalue);
- hessian-eigenthings' `lanczos(HessianOperator(...), k=k, max_iter=--lanczos-steps,
  which="LA", reorthogonalize=True)`: its defaults (2k steps, which="LM", no
  reorthogonalization past 50 steps) return ghost copies of λ₁ and negative eigenvalues
  among the "top k" here;
- scipy's ARPACK (`eigsh`) on the torch HVP, tol 1e-5.
It then measures the relative residuals ‖Hx−λx‖/|λ| of what each returns (those
products are not counted). Prints a Markdown table; --json writes the rows.

--whole-process P compares what users run, launch to exit, in P interleaved pairs: the
default `mpirun -n --ranks python scripts/spectrum.py` (its check pass, true residuals,
error bars, results file and PNG) against a fresh Python process that imports torch,
builds the model and runs the hessian-eigenthings row above; it prints both wall times,
their ratio, and how far the eigenvalues agree.
Skips (exit 0, a note) when no such Python is given.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def torch_model(name, theta, dtype):
    """The built-in model `name` in PyTorch with hessmpi's θ, and its input layout."""
    import torch
    import torch.nn.functional as F

    if name == "softmax":  # θ index pixel·10 + class
        model = torch.nn.Linear(784, 10, bias=False).to(dtype)
        with torch.no_grad():
            model.weight.copy_(torch.tensor(theta.reshape(784, 10).T, dtype=dtype))
        return model
    shapes = [(5, 5, 1, 32), (32,), (5, 5, 32, 64), (64,), (256, 128), (128,), (128, 10), (10,)]
    parts, o = [], 0
    for s in shapes:
        k = int(np.prod(s))
        parts.append(torch.tensor(theta[o:o + k].reshape(s), dtype=dtype))
        o += k

    class CNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 32, 5)
            self.c2 = torch.nn.Conv2d(32, 64, 5)
            self.d1 = torch.nn.Linear(256, 128)
            self.d2 = torch.nn.Linear(128, 10)
            self.to(dtype)
            with torch.no_grad():
                self.c1.weight.copy_(parts[0].permute(3, 2, 0, 1))
                self.c1.bias.copy_(parts[1])
                self.c2.weight.copy_(parts[2].permute(3, 2, 0, 1))
                self.c2.bias.copy_(parts[3])
                self.d1.weight.copy_(parts[4].T)
                self.d1.bias.copy_(parts[5])
                self.d2.weight.copy_(parts[6].T)
                self.d2.bias.copy_(parts[7])

        def forward(self, h):
            h = F.leaky_relu(F.max_pool2d(self.c1(h), 2), 0.01)
            h = F.leaky_relu(F.max_pool2d(self.c2(h), 2), 0.01)
            h = F.max_pool2d(h, 2).permute(0, 2, 3, 1).reshape(h.shape[0], -1)  # Keras' HWC flatten
            h = F.leaky_relu(self.d1(h), 0.01)
            return F.leaky_relu(self.d2(h), 0.01)

    return CNN()


def torch_problem(path, threads):
    """(model, x, y, dtype name) from the .npz that main() wrote."""
    import torch

    torch.set_num_threads(threads)
    d = np.load(path)
    name, dtype = str(d["model"]), getattr(torch, str(d["dtype"]))
    x = torch.tensor(d["images"], dtype=dtype)
    x = x.reshape(len(x), -1) if name == "softmax" else x.permute(0, 3, 1, 2).contiguous()  # NCHW
    return torch_model(name, d["theta"], dtype), x, torch.tensor(d["labels"], dtype=torch.int64), str(d["dtype"])


def eigenthings_solve(model, x, y, top_n, steps):
    """hessian-eigenthings' Lanczos for the top_n largest eigenpairs: (values, vectors, products)."""
    import torch
    from hessian_eigenthings import HessianOperator, lanczos, supervised_loss

    op = HessianOperator(model, [(x, y)], supervised_loss(torch.nn.CrossEntropyLoss()))
    count, matvec = [0], op.matvec

    def counted(v):
        count[0] += 1
        return matvec(v)

    op.matvec = counted
    res = lanczos(op, k=top_n, max_iter=steps, tol=1e-5, which="LA", reorthogonalize=True, seed=0)
    return res.eigenvalues, res.eigenvectors, count[0]


def eigenthings_process(path, threads, top_n, steps, out_json):
    """The whole-process side: what a user of hessian-eigenthings runs, eigenvalues to out_json."""
    model, x, y, _ = torch_problem(path, threads)
    values, _, products = eigenthings_solve(model, x, y, top_n, steps)
    with open(out_json, "w") as f:
        json.dump({"eigenvalues": [float(v) for v in values], "n_hvp": products}, f)


def torch_side(path, threads, top_n, tools, steps, out_json):
    import torch

    model, x, y, dtype = torch_problem(path, threads)
    crit = torch.nn.CrossEntropyLoss()
    params = [p for p in model.parameters()]

    def gradient():
        model.zero_grad()
        crit(model(x), y).backward()

    def hvp(v):
        model.zero_grad()
        g = torch.autograd.grad(crit(model(x), y), params, create_graph=True)
        return torch.autograd.grad(g, params, grad_outputs=v)

    def flat_hvp(vec):
        chunks = torch.split(vec, [p.numel() for p in params])
        return torch.cat([h.reshape(-1) for h in hvp([c.reshape(p.shape) for c, p in zip(chunks, params)])])

    def best(fn, r=3):
        fn()
        ts = []
        for _ in range(r):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    def rel_residuals(values, vectors):  # vectors: one flat tensor per value; the norms in float64
        dtype = params[0].dtype
        return [float(torch.linalg.norm(flat_hvp(v.to(dtype)).double() - lam * v.double()) /
                      torch.linalg.norm(v.double()) / abs(lam)) for lam, v in zip(values, vectors)]

    v0 = [torch.randn_like(p) for p in params]
    tg, th = best(gradient), best(lambda: hvp(v0))
    common = dict(torch=torch.__version__, threads=threads, n_samples=len(y), dtype=dtype, grad_s=tg, hvp_s=th,
                  ratio=th / tg)
    rows = []
    if "pyhessian" in tools:
        from pyhessian import hessian

        ph = sys.modules["pyhessian.hessian"]  # the module (the package exports the class under its name)
        count = [0]
        orig = ph.hessian_vector_product

        def counted(*a, **k):
            count[0] += 1
            return orig(*a, **k)

        ph.hessian_vector_product = counted
        torch.manual_seed(0)
        t0 = time.perf_counter()
        comp = hessian(model, crit, data=(x, y), cuda=False)
        values, vectors = comp.eigenvalues(top_n=top_n)
        wall = time.perf_counter() - t0
        rel = rel_residuals(values, [torch.cat([b.reshape(-1) for b in vec]) for vec in vectors])
        rows.append(dict(tool="PyHessian (power iteration, tol 1e-3)", **common, n_hvp=count[0], wall_s=wall,
                         eigenvalues=[float(v) for v in values], max_rel_residual=max(rel), rel_residuals=rel))
    if "eigenthings" in tools:
        t0 = time.perf_counter()
        values, vectors, products = eigenthings_solve(model, x, y, top_n, steps)
        wall = time.perf_counter() - t0
        rel = rel_residuals(values.tolist(), list(vectors))
        rows.append(dict(tool=f"hessian-eigenthings (Lanczos, {steps} steps, LA, reorthogonalized)", **common,
                         n_hvp=products, wall_s=wall, eigenvalues=[float(v) for v in values],
                         max_rel_residual=max(rel), rel_residuals=rel))
    if "arpack" in tools:
        rows += arpack_rows(params, flat_hvp, rel_residuals, top_n, torch, common)
    with open(out_json, "w") as f:
        json.dump(rows, f)


def arpack_rows(params, flat_hvp, rel_residuals, top_n, torch, common):
    """scipy's ARPACK Lanczos (eigsh) on the same torch HVP, as curvlinops runs it, asked for
    the top_n largest eigenvalues to tol 1e-5 (relative residuals by rel_residuals, uncounted);
    [] without scipy."""
    try:
        from scipy.sparse.linalg import LinearOperator, eigsh
    except ImportError:
        return []
    n = sum(p.numel() for p in params)
    dtype = params[0].dtype
    count = [0]

    def matvec(x):
        count[0] += 1
        return flat_hvp(torch.from_numpy(np.asarray(x).ravel()).to(dtype)).double().numpy()

    t0 = time.perf_counter()
    values, vectors = eigsh(LinearOperator((n, n), matvec=matvec, dtype=np.float64), k=top_n, which="LA",
                            tol=1e-5, v0=np.random.default_rng(0).standard_normal(n))
    wall = time.perf_counter() - t0
    hvps = count[0]
    rel = rel_residuals(values.tolist(), list(torch.from_numpy(vectors.T.copy())))
    return [dict(tool="scipy eigsh (ARPACK Lanczos, as curvlinops), tol 1e-5", **common, n_hvp=hvps,
                 wall_s=wall, eigenvalues=sorted(map(float, values), reverse=True), max_rel_residual=max(rel),
                 rel_residuals=rel)]


def whole_process(args, npz, tmp):
    """--whole-process: P interleaved pairs of the default hessmpi run and a hessian-eigenthings
    process, launch to exit; the rows of the table."""
    import h5py

    root = os.path.dirname(HERE)
    hessmpi_cmd = ["mpirun", "-n", str(args.ranks), sys.executable, os.path.join(root, "scripts", "spectrum.py"),
                   "--model", args.model, "--n-samples", str(args.n_samples), "--nev", str(args.nev),
                   "--dtype", args.dtype, "--seed", str(args.seed), "--out", os.path.join(tmp, "spectrum.h5"),
                   "--overwrite"]
    out = os.path.join(tmp, "eigenthings.json")
    torch_cmd = [args.torch_python, os.path.abspath(__file__), "--threads", str(args.threads), "--nev",
                 str(args.nev), "--lanczos-steps", str(args.lanczos_steps), "--_eigenthings-process", npz, out]
    env = {**os.environ, "HESSMPI_TF_THREADS": "1"}
    rows = []
    for pair in range(1, args.whole_process + 1):
        t0 = time.perf_counter()
        subprocess.run(hessmpi_cmd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
        t1 = time.perf_counter()
        subprocess.run(torch_cmd, check=True, stdin=subprocess.DEVNULL)
        t2 = time.perf_counter()
        with h5py.File(os.path.join(tmp, "spectrum.h5"), "r") as f:
            ours, products = f["spectrum/eigenvalues"][()], int(f.attrs["n_matvecs"])
        with open(out) as f:
            theirs = json.load(f)
        k = min(len(ours), len(theirs["eigenvalues"]))
        agree = np.abs(np.sort(theirs["eigenvalues"])[::-1][:k] - ours[:k]) / np.abs(ours[:k])
        rows.append(dict(pair=pair, hessmpi_s=t1 - t0, hessmpi_hvp=products, eigenthings_s=t2 - t1,
                         eigenthings_hvp=theirs["n_hvp"], ratio=(t1 - t0) / (t2 - t1),
                         max_rel_difference=float(agree.max()), hessmpi_eigenvalues=ours.tolist(),
                         eigenthings_eigenvalues=theirs["eigenvalues"]))
        print(f"pair {pair}: hessmpi {t1 - t0:.1f} s, hessian-eigenthings {t2 - t1:.1f} s", file=sys.stderr)
    print(f"\nWhole process, launch to exit: {args.model}, {args.n_samples} mnist-5k digits, {args.dtype}, top "
          f"{args.nev}; hessmpi's default spectrum.py on {args.ranks} ranks × 1 thread against "
          f"hessian-eigenthings' Lanczos ({args.lanczos_steps} steps, LA, reorthogonalized) in one process of "
          f"{args.threads} threads; {args.whole_process} interleaved pairs\n")
    print("| pair | hessmpi (s) | HVPs | hessian-eigenthings (s) | HVPs | ratio | eigenvalues agree to (rel.) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['pair']} | {r['hessmpi_s']:.1f} | {r['hessmpi_hvp']} | {r['eigenthings_s']:.1f} | "
              f"{r['eigenthings_hvp']} | **{r['ratio']:.2f}** | {r['max_rel_difference']:.1e} |")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch-python", default=os.environ.get("HESSMPI_TORCH_PYTHON"))
    p.add_argument("--model", default="cnn", choices=("cnn", "softmax"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2, help="torch's threads")
    p.add_argument("--nev", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lanczos-steps", type=int, default=100, help="hessian-eigenthings' max_iter")
    p.add_argument("--tools", default="pyhessian,eigenthings,arpack",
                   help="pyhessian (its power iteration), eigenthings (its Lanczos), arpack (scipy eigsh)")
    p.add_argument("--whole-process", type=int, default=0, metavar="P",
                   help="P interleaved pairs, launch to exit: hessmpi's default spectrum.py against "
                        "hessian-eigenthings")
    p.add_argument("--ranks", type=int, default=2, help="hessmpi's ranks in --whole-process")
    p.add_argument("--json", default=None)
    p.add_argument("--_torch-side", nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_eigenthings-process", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._eigenthings_process:
        return eigenthings_process(args._eigenthings_process[0], args.threads, args.nev, args.lanczos_steps,
                                   args._eigenthings_process[1])
    if args._torch_side:
        return torch_side(args._torch_side[0], args.threads, args.nev, args.tools.split(","), args.lanczos_steps,
                          args._torch_side[1])
    if not args.torch_python:
        print("\nPyTorch reference skipped: pass --torch-python PY (a Python with torch, pyhessian, "
              "hessian_eigenthings and scipy) or set HESSMPI_TORCH_PYTHON\n")
        return
    sys.path.insert(0, os.path.dirname(HERE))
    from hessmpi.data import datasets
    from hessmpi.models import builtin

    digits = datasets.load("mnist-5k").split("train", args.n_samples)  # uint8 pixels (n, 28, 28, 1)
    x = digits.x.astype(args.dtype) / 255  # the values hessmpi's models see (k/255 rounded to the dtype)
    y = np.array(digits.y, dtype=np.int64)
    theta = builtin.init(args.model, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        npz, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.json")
        np.savez(npz, images=x, labels=y, theta=theta, model=args.model, dtype=args.dtype)
        if args.whole_process:
            rows = whole_process(args, npz, tmp)
        else:
            subprocess.run([args.torch_python, os.path.abspath(__file__), "--threads", str(args.threads),
                            "--nev", str(args.nev), "--tools", args.tools, "--lanczos-steps", str(args.lanczos_steps),
                            "--_torch-side", npz, out], check=True)
            with open(out) as f:
                rows = json.load(f)
            print_tools(args, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def print_tools(args, rows):
    if not rows:
        print("\nno PyTorch tool ran\n")
        return
    print(f"\nPyTorch tools on this machine: {args.model}, {rows[0]['n_samples']} mnist-5k digits, {args.dtype}, "
          f"torch {rows[0]['torch']}, {rows[0]['threads']} threads, 1 process\n")
    print(f"| tool | gradient (s) | HVP (s) | HVP / gradient | HVPs for top-{args.nev} | wall (s) | max rel. residual |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['tool']} | {row['grad_s']:.3f} | {row['hvp_s']:.3f} | {row['ratio']:.2f} | {row['n_hvp']} | "
              f"{row['wall_s']:.1f} | {row['max_rel_residual']:.1e} |")


if __name__ == "__main__":
    main()
