#!/usr/bin/env python3
"""Eigenpairs of the Hessian of the mean training loss: SLEPc on the distributed operator.

    mpirun -n 8 python scripts/spectrum.py --model cnn --nev 10 -hess_eps_monitor

Writes /spectrum/eigenvalues, /spectrum/eigenvectors (nev × n_params, canonical θ
order), /spectrum/residuals (true ‖Hx−λx‖) and /model/params to --out, and a PNG
next to it.
"""

import os
import sys

import numpy as np

from hessmpi import cli


def main():
    ours, petsc_args = cli.split_argv(sys.argv[1:])
    comm = cli.world()
    with cli.all_ranks(comm):
        parser = cli.common_parser(__doc__.splitlines()[0], "results/spectrum.h5")
        parser.add_argument("--nev", type=int, default=10, help="number of eigenpairs")
        parser.add_argument("--which", default="largest", choices=("largest", "smallest", "magnitude"))
        parser.add_argument("--tol", type=float, default=None,
                            help="relative residual tolerance (default 1e-8 in float64, 1e-5 in float32)")
        parser.add_argument("--max-passes", type=int, default=20,
                            help="deflated passes that look for missing copies of repeated eigenvalues "
                                 "(1 skips the check)")
        args = parser.parse_args(ours)
        cli.init_petsc(petsc_args)
        from hessmpi import results

        problem, theta = cli.problem_from_args(args, comm)
        if not 1 <= args.nev < problem.n_params:
            raise cli.HessmpiError(f"--nev must be between 1 and {problem.n_params - 1}, got {args.nev}")
        if args.max_passes < 1:
            raise cli.HessmpiError(f"--max-passes must be at least 1, got {args.max_passes}")
        if comm.Get_rank() == 0:
            results.check_output(args.out, args.overwrite)
    from hessmpi import eigen, plots, results
    from hessmpi.petsc import shell_matrix, vec_to_full

    tol = args.tol or (1e-8 if args.dtype == "float64" else 1e-5)
    record = cli.RunRecord(args, comm, problem.n_params, problem.n_samples)
    cli.say(cli.describe_run(args, problem, comm))
    op = problem.hessian
    op.on_matvec = cli.progress_printer()
    mat = shell_matrix(op)
    cli.say(f"solving for the {args.nev} {args.which} eigenpairs (tol {tol:g}, options prefix -hess_)")
    res = eigen.solve(mat, args.nev, args.which, tol=tol, prefix="hess_", seed=args.seed,
                      max_passes=args.max_passes, matvec_counter=lambda: op.n_matvecs,
                      log=lambda line: cli.say("  " + line))
    if res.converged == 0:
        raise cli.HessmpiError(f"no eigenpair converged in {res.iterations} iterations; try "
                               f"-hess_eps_max_it, -hess_eps_ncv or a looser --tol")
    vectors = np.array([vec_to_full(v, comm) for v in res.vectors]).reshape(len(res.vectors), problem.n_params)
    if not (np.all(np.isfinite(res.values)) and np.all(np.isfinite(vectors))):
        raise cli.HessmpiError("the eigen solve produced non-finite values: check --weights (NaN?) "
                               "and try --dtype float64")
    cli.say(f"{'i':>3}  {'eigenvalue':>22}  {'residual':>10}  {'rel. residual':>13}")
    for i, (lam, r) in enumerate(zip(res.values, res.residuals)):
        cli.say(f"{i:3d}  {lam:22.15g}  {r:10.3e}  {r / max(abs(lam), 1e-300):13.3e}")
    if res.converged < args.nev:
        cli.say(f"warning: only {res.converged} of {args.nev} eigenpairs converged; "
                f"try -hess_eps_max_it or -hess_eps_ncv")
    attrs = record.finish(n_matvecs=res.n_matvecs, iterations=res.iterations, converged=res.converged,
                          passes=res.passes, eps_type=res.solver, tol=tol, which=args.which,
                          nev=args.nev, compute_seconds=op.compute_seconds, comm_seconds=op.comm_seconds)
    cli.say(f"{res.n_matvecs} Hessian-vector products in {attrs['wall_time']:.1f} s "
            f"({op.comm_seconds / max(op.compute_seconds + op.comm_seconds, 1e-12):.1%} in communication)")
    if comm.Get_rank() == 0:
        datasets = {"spectrum/eigenvalues": res.values, "spectrum/eigenvectors": vectors,
                    "spectrum/residuals": res.residuals, "model/params": theta}
        results.write(args.out, datasets, attrs)
        written = [args.out]
        if not args.no_plot:
            png = os.path.splitext(args.out)[0] + ".png"
            plots.spectrum(datasets, attrs, png)
            written.append(png)
        cli.say("wrote " + ", ".join(written))


if __name__ == "__main__":
    cli.main_guard(main)
