#!/usr/bin/env python3
"""Eigenpairs of the Hessian of the mean training loss: SLEPc on the distributed operator.

    mpirun -n 8 python scripts/spectrum.py --model cnn --nev 10 -hess_eps_monitor

Writes /spectrum/eigenvalues, /spectrum/eigenvectors (nev × n_params in canonical θ
order; nev × the block's size with --layer), /spectrum/residuals (true ‖Hx−λx‖) and
/model/params to --out, and a PNG next to it.

Each eigenvalue gets an error bar from the spread of its Rayleigh quotient over
--error-groups contiguous groups of the samples (hessmpi.uncertainty: the standard
error and a 95 % Student-t interval of vᵀHv for the fixed eigenvector v), written to
/spectrum/stderr, /spectrum/ci_low, /spectrum/ci_high, /spectrum/group_quotients
(groups × nev) and /spectrum/group_sizes; fixed groups give the same numbers on any
rank count.

With --checkpoint FILE the pairs held after every pass are saved to FILE (atomically,
by rank 0); a run started again with the same flags and FILE continues from there
instead of starting over, and gives the eigenvalues of an uninterrupted run (a run with
another model, data, operator, --layer, … refuses it). FILE is removed once the results
are written.
"""

import os
import sys

import numpy as np

from hessmpi import cli, petsc_options


def main():
    ours, petsc_args = cli.split_argv(sys.argv[1:])
    comm = cli.world()
    with cli.all_ranks(comm):
        parser = cli.common_parser(__doc__.splitlines()[0], "results/spectrum.h5")
        parser.add_argument("--nev", type=int, default=10, help="number of eigenpairs")
        parser.add_argument("--which", default="largest", choices=("largest", "smallest", "magnitude"))
        parser.add_argument("--tol", type=float, default=None,
                            help="residual tolerance ‖Hx−λx‖ ≤ tol·‖H‖₂ (default 1e-8 in float64, 1e-5 in float32)")
        parser.add_argument("--max-passes", type=int, default=20,
                            help="deflated passes that look for missing copies of repeated eigenvalues "
                                 "(1 skips the check)")
        parser.add_argument("--checkpoint", default=None, metavar="FILE",
                            help="save progress after every pass to FILE and resume from it if it exists "
                                 "(a job killed by its time limit continues when resubmitted)")
        parser.add_argument("--error-groups", type=int, default=None, metavar="G",
                            help="error bars of the eigenvalues from G contiguous groups of the samples "
                                 f"(default {ERROR_GROUPS}, or --n-samples if fewer; 0: none)")
        args = parser.parse_args(ours)
        cli.init_petsc(petsc_args)
        petsc_options.check_petsc_options(eps=("hess_", "hess_norm_"))  # a misspelt option fails now
        if args.max_passes < 1:
            raise cli.HessmpiError(f"--max-passes must be at least 1, got {args.max_passes}")
        # checks --nev against the operator's size, --error-groups, --out and --checkpoint's folder
        problem, theta = cli.problem_from_args(args, comm, check=lambda n: error_groups(args.error_groups, n))
        groups = error_groups(args.error_groups, problem.n_samples)
        tol = args.tol or (1e-8 if args.dtype == "float64" else 1e-5)
        identity = {"model": args.model, "dataset": args.dataset, "n_samples": problem.n_samples,
                    "dtype": args.dtype, "seed": args.seed, "which": args.which, "nev": args.nev, "tol": tol,
                    "operator": problem.operator_kind, "layer": problem.layer or ""}
        saved = None
        if comm.Get_rank() == 0 and args.checkpoint:
            saved = load_checkpoint(args.checkpoint, identity, theta)
    saved = comm.bcast(saved)
    from hessmpi import eigen, plots, uncertainty
    from hessmpi.petsc import shell_matrix, vec_from_full, vec_to_full

    record = cli.RunRecord(args, comm, problem.n_params, problem.n_samples)
    cli.say(cli.describe_run(args, problem, comm))
    op = problem.operator  # the Hessian or the GGN (--operator), all of θ or one block (--layer)
    op.on_matvec = cli.progress_printer()
    mat = shell_matrix(op)
    cli.say(f"solving for the {args.nev} {args.which} eigenpairs (tol {tol:g}, options prefix -hess_)")
    resume, on_pass = None, None
    if args.checkpoint:
        if saved is not None:
            resume = eigen.Progress(vectors=[vec_from_full(mat, x) for x in saved.pop("vectors")], **saved)
            cli.say(f"checkpoint {args.checkpoint}: {resume.passes} pass(es) done before")

        def on_pass(progress):
            vectors = [vec_to_full(v, comm) for v in progress.vectors]
            if comm.Get_rank() == 0:
                save_checkpoint(args.checkpoint, progress, vectors, {**record.attrs, **identity}, theta, op.n)
                cli.say(f"  checkpoint: {progress.passes} pass(es) saved to {args.checkpoint}")
    res = eigen.solve(mat, args.nev, args.which, tol=tol, prefix="hess_", seed=args.seed,
                      max_passes=args.max_passes, matvec_counter=lambda: op.n_matvecs,
                      log=lambda line: cli.say("  " + line), on_pass=on_pass, resume=resume)
    if res.converged == 0:
        raise cli.HessmpiError(f"no eigenpair converged in {res.iterations} iterations; try "
                               f"-hess_eps_max_it, -hess_eps_ncv or a looser --tol")
    vectors = np.array([vec_to_full(v, comm) for v in res.vectors]).reshape(len(res.vectors), op.n)
    if not (np.all(np.isfinite(res.values)) and np.all(np.isfinite(vectors))):
        raise cli.HessmpiError("the eigen solve produced non-finite values: check --weights (NaN?) "
                               "and try --dtype float64")
    for v in res.vectors + (resume.vectors if resume else []):  # destroying one twice is harmless
        v.destroy()
    mat.destroy()  # on every rank, before rank 0 writes: left to garbage collection, PETSc's exit can hang
    spread = uncertainty.for_problem(problem, vectors, n_groups=groups) if groups else None
    cli.say(f"{'i':>3}  {'eigenvalue':>22}  {'residual':>10}  {'rel. residual':>13}"
            + (f"  λ ± standard error [{spread.confidence:.0%} interval, {groups} groups]" if spread else ""))
    for i, (lam, r) in enumerate(zip(res.values, res.residuals)):
        bar = (f"  {lam:.6g} ± {spread.stderr[i]:.2g} [{spread.low[i]:.6g}, {spread.high[i]:.6g}]"
               if spread else "")
        cli.say(f"{i:3d}  {lam:22.15g}  {r:10.3e}  {r / max(abs(lam), 1e-300):13.3e}{bar}")
    if res.converged < args.nev:
        cli.say(f"warning: only {res.converged} of {args.nev} eigenpairs converged; "
                f"try -hess_eps_max_it or -hess_eps_ncv")
    attrs = record.finish(n_matvecs=res.n_matvecs, iterations=res.iterations, converged=res.converged,
                          passes=res.passes, eps_type=res.solver, tol=tol, which=args.which,
                          nev=args.nev, compute_seconds=op.compute_seconds, comm_seconds=op.comm_seconds,
                          resumed_after_pass=resume.passes if resume else 0, operator_size=op.n,
                          error_groups=groups, confidence=spread.confidence if spread else float("nan"),
                          errorbar_products=len(vectors) if spread else 0)
    cli.say(f"{res.n_matvecs} Hessian-vector products in {attrs['wall_time']:.1f} s "
            f"({op.comm_seconds / max(op.compute_seconds + op.comm_seconds, 1e-12):.1%} in communication)")
    if comm.Get_rank() == 0:
        datasets = {"spectrum/eigenvalues": res.values, "spectrum/eigenvectors": vectors,
                    "spectrum/residuals": res.residuals, "model/params": theta}
        if spread:
            datasets.update({"spectrum/stderr": spread.stderr, "spectrum/ci_low": spread.low,
                             "spectrum/ci_high": spread.high, "spectrum/group_quotients": spread.quotients,
                             "spectrum/group_sizes": spread.sizes})
        cli.write_results(args, datasets, attrs, plots.spectrum)
        if args.checkpoint and os.path.exists(args.checkpoint):
            os.unlink(args.checkpoint)
            cli.say(f"removed the checkpoint {args.checkpoint}")


ERROR_GROUPS = 10


def error_groups(given, n_samples):
    """The number of groups of the error bars: --error-groups if given (0, or 2..n_samples,
    else HessmpiError), by default ERROR_GROUPS capped at n_samples (0 with one sample)."""
    if given is None:
        groups = min(ERROR_GROUPS, n_samples)
        return groups if groups >= 2 else 0
    if given != 0 and not 2 <= given <= n_samples:
        raise cli.HessmpiError(f"--error-groups must be 0 (no error bars) or between 2 and the "
                               f"{n_samples} samples, got {given}")
    return given


CHECKPOINT_COUNTERS = ("passes", "next_want", "iterations", "n_matvecs", "norm_estimate", "solver")


def save_checkpoint(path, progress, vectors, attrs, theta, n):
    """Write the solve's progress (its vectors as full arrays of the operator's size n: all of
    θ, or one layer's block) and the run's identity to path, atomically."""
    from hessmpi import results

    datasets = {"checkpoint/values": progress.values, "checkpoint/residuals": progress.residuals,
                "checkpoint/vectors": np.array(vectors).reshape(len(vectors), n),
                "model/params": theta}
    counters = {name: getattr(progress, name) for name in CHECKPOINT_COUNTERS}
    results.write(path, datasets, {**attrs, **counters, "pass_log": "\n".join(progress.pass_log)})


def load_checkpoint(path, identity, theta):
    """The saved progress at path as keyword arguments of eigen.Progress (vectors as full
    arrays), or None if there is no file; raise HessmpiError if it belongs to another run."""
    from hessmpi import results

    if not os.path.exists(path):
        return None
    datasets, attrs = results.read(path)
    if "checkpoint/vectors" not in datasets:
        raise cli.HessmpiError(f"--checkpoint {path} is not a spectrum checkpoint; choose another file")
    differ = [f"{name} {attrs.get(name)!r} there, {value!r} here" for name, value in identity.items()
              if attrs.get(name) != value]
    if not np.array_equal(datasets["model/params"], theta):
        differ.append("other weights")
    if differ:
        raise cli.HessmpiError(f"--checkpoint {path} was written by a different run ({'; '.join(differ)}); "
                               f"delete it to start afresh, or pass another --checkpoint")
    saved = {name: attrs[name] for name in CHECKPOINT_COUNTERS}
    saved.update(values=datasets["checkpoint/values"], residuals=datasets["checkpoint/residuals"],
                 vectors=list(datasets["checkpoint/vectors"]),
                 pass_log=attrs["pass_log"].split("\n") if attrs["pass_log"] else [])
    return saved


if __name__ == "__main__":
    cli.main_guard(main)
