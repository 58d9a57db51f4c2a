#!/usr/bin/env python3
"""The PyTorch reference: PyHessian's top-k power iteration on the same CNN, data and θ.

    python bench/pyhessian_ref.py --torch-python /path/to/python-with-torch-and-pyhessian [--n-samples 1000]

hessmpi does not depend on PyTorch. This script writes the samples and θ (from the
hessmpi environment) to a temporary .npz and runs itself under --torch-python (a
Python with `torch` and `pyhessian` installed, e.g. a throw-away venv; default:
$HESSMPI_TORCH_PYTHON). There it builds the CNN of DESIGN.md in PyTorch with the
same weights (the flatten is done in Keras' HWC order, so the function is the same),
times one gradient and one HVP, and runs `pyhessian.hessian(...).eigenvalues(top_n=10)`
on the whole shard as one batch (PyHessian's defaults: tol 1e-3 on the change of the
Rayleigh quotient, at most 100 products per eigenvalue), counting its products. It
then measures the relative residuals ‖Hx−λx‖/|λ| of what PyHessian returns (those
products are not counted). Prints a Markdown table; --json writes the row.
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


def torch_side(path, threads, top_n, tools, out_json):
    import torch
    import torch.nn.functional as F
    from pyhessian import hessian

    ph = sys.modules["pyhessian.hessian"]  # the module (the package exports the class under its name)

    torch.set_num_threads(threads)
    d = np.load(path)
    x = torch.tensor(d["images"], dtype=torch.float32).permute(0, 3, 1, 2).contiguous()  # NCHW
    y = torch.tensor(d["labels"], dtype=torch.int64)
    theta = d["theta"]
    shapes = [(5, 5, 1, 32), (32,), (5, 5, 32, 64), (64,), (256, 128), (128,), (128, 10), (10,)]
    parts, o = [], 0
    for s in shapes:
        k = int(np.prod(s))
        parts.append(theta[o:o + k].reshape(s))
        o += k

    class CNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 32, 5)
            self.c2 = torch.nn.Conv2d(32, 64, 5)
            self.d1 = torch.nn.Linear(256, 128)
            self.d2 = torch.nn.Linear(128, 10)
            with torch.no_grad():
                self.c1.weight.copy_(torch.tensor(parts[0]).permute(3, 2, 0, 1))
                self.c1.bias.copy_(torch.tensor(parts[1]))
                self.c2.weight.copy_(torch.tensor(parts[2]).permute(3, 2, 0, 1))
                self.c2.bias.copy_(torch.tensor(parts[3]))
                self.d1.weight.copy_(torch.tensor(parts[4]).T)
                self.d1.bias.copy_(torch.tensor(parts[5]))
                self.d2.weight.copy_(torch.tensor(parts[6]).T)
                self.d2.bias.copy_(torch.tensor(parts[7]))

        def forward(self, h):
            h = F.leaky_relu(F.max_pool2d(self.c1(h), 2), 0.01)
            h = F.leaky_relu(F.max_pool2d(self.c2(h), 2), 0.01)
            h = F.max_pool2d(h, 2).permute(0, 2, 3, 1).reshape(h.shape[0], -1)  # Keras' HWC flatten
            h = F.leaky_relu(self.d1(h), 0.01)
            return F.leaky_relu(self.d2(h), 0.01)

    model = CNN()
    crit = torch.nn.CrossEntropyLoss()
    params = [p for p in model.parameters()]

    def gradient():
        model.zero_grad()
        crit(model(x), y).backward()

    def hvp(v):
        model.zero_grad()
        g = torch.autograd.grad(crit(model(x), y), params, create_graph=True)
        return torch.autograd.grad(g, params, grad_outputs=v)

    def best(fn, r=3):
        fn()
        ts = []
        for _ in range(r):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    v0 = [torch.randn_like(p) for p in params]
    tg, th = best(gradient), best(lambda: hvp(v0))
    rows = []
    if "pyhessian" in tools:
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
        rel = []
        for lam, vec in zip(values, vectors):
            hv = hvp(vec)
            r = torch.sqrt(sum(((a - lam * b) ** 2).sum() for a, b in zip(hv, vec))).item()
            n = torch.sqrt(sum((b ** 2).sum() for b in vec)).item()
            rel.append(r / n / abs(lam))
        rows.append(dict(tool="PyHessian (power iteration, tol 1e-3)", torch=torch.__version__, threads=threads,
                         n_samples=len(y), grad_s=tg, hvp_s=th, ratio=th / tg, n_hvp=count[0], wall_s=wall,
                         eigenvalues=[float(v) for v in values], max_rel_residual=max(rel), rel_residuals=rel))
    if "arpack" in tools:
        rows += arpack_rows(params, hvp, top_n, torch, tg, th, threads, len(y))
    with open(out_json, "w") as f:
        json.dump(rows, f)


def arpack_rows(params, hvp, top_n, torch, tg, th, threads, n_samples):
    """scipy's ARPACK Lanczos (eigsh) on the same torch HVP, as hessian-eigenthings and
    curvlinops run it, asked for the top_n largest eigenvalues to tol 1e-5; [] without scipy."""
    try:
        from scipy.sparse.linalg import LinearOperator, eigsh
    except ImportError:
        return []
    sizes = [p.numel() for p in params]
    n = sum(sizes)
    count = [0]

    def matvec(x):
        count[0] += 1
        chunks = torch.split(torch.from_numpy(np.asarray(x, dtype=np.float32).ravel()), sizes)
        v = [c.reshape(p.shape) for c, p in zip(chunks, params)]
        return torch.cat([h.reshape(-1) for h in hvp(v)]).double().numpy()

    t0 = time.perf_counter()
    values, vectors = eigsh(LinearOperator((n, n), matvec=matvec, dtype=np.float64), k=top_n, which="LA",
                            tol=1e-5, v0=np.random.default_rng(0).standard_normal(n))
    wall = time.perf_counter() - t0
    hvps = count[0]
    rel = [float(np.linalg.norm(matvec(vectors[:, i]) - lam * vectors[:, i]) / abs(lam))
           for i, lam in enumerate(values)]
    return [dict(tool="scipy eigsh (ARPACK Lanczos, as hessian-eigenthings/curvlinops), tol 1e-5",
                 torch=torch.__version__, threads=threads, n_samples=n_samples, grad_s=tg, hvp_s=th,
                 ratio=th / tg, n_hvp=hvps, wall_s=wall, eigenvalues=sorted(map(float, values), reverse=True),
                 max_rel_residual=max(rel), rel_residuals=rel)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch-python", default=os.environ.get("HESSMPI_TORCH_PYTHON"))
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nev", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tools", default="pyhessian,arpack",
                   help="pyhessian (its power iteration) and/or arpack (scipy eigsh on the torch HVP)")
    p.add_argument("--json", default=None)
    p.add_argument("--_torch-side", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._torch_side:
        return torch_side(args._torch_side[0], args.threads, args.nev, args.tools.split(","), args._torch_side[1])
    if not args.torch_python:
        print("\nPyHessian reference skipped: pass --torch-python PY (a Python with torch and pyhessian) "
              "or set HESSMPI_TORCH_PYTHON\n")
        return
    sys.path.insert(0, os.path.dirname(HERE))
    from hessmpi.data import datasets
    from hessmpi.models import builtin

    digits = datasets.load("mnist-5k").split("train", args.n_samples)  # uint8 pixels (n, 28, 28, 1)
    x = digits.x.astype(np.float32) / 255  # the float32 values hessmpi's CNN sees (k/255 rounded)
    y = np.array(digits.y, dtype=np.int64)
    theta = builtin.init("cnn", args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        npz, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.json")
        np.savez(npz, images=x, labels=y, theta=theta)
        subprocess.run([args.torch_python, os.path.abspath(__file__), "--threads", str(args.threads),
                        "--nev", str(args.nev), "--tools", args.tools, "--_torch-side", npz, out], check=True)
        with open(out) as f:
            rows = json.load(f)
    if not rows:
        print("\nno PyTorch tool ran (scipy missing for arpack?)\n")
        return
    print(f"\nPyTorch tools on this machine: CNN, {rows[0]['n_samples']} mnist-5k digits, float32, "
          f"torch {rows[0]['torch']}, {rows[0]['threads']} threads, 1 process\n")
    print(f"| tool | gradient (s) | HVP (s) | HVP / gradient | HVPs for top-{args.nev} | wall (s) | max rel. residual |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['tool']} | {row['grad_s']:.3f} | {row['hvp_s']:.3f} | {row['ratio']:.2f} | {row['n_hvp']} | "
              f"{row['wall_s']:.1f} | {row['max_rel_residual']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
