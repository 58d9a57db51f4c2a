#!/usr/bin/env python3
"""Rank of the Hessian of the first n training samples, for each batch size n.

    mpirun -n 8 python scripts/rank_curve.py --model softmax
    mpirun -n 8 python scripts/rank_curve.py --model cnn --batch-sizes 1,2,5 --dtype float64
    mpirun -n 8 python scripts/rank_curve.py --regularization laplacian --gamma 1e-4

For each n: the numerical rank (eigenvalues with |λ| > tol·max|λ|), the leading
eigenvalues, the counts above several thresholds, the smallest eigenvalue, the HVPs
and seconds spent, and (from the images) dead pixels, rank(X) and the softmax caps
9·rank(X) and n_params − pixels. Routes: dense (softmax regression: exact, from
per-sample factors; tiny models: from unit vectors) and matrix-free (randomized range
finder + Rayleigh–Ritz on the distributed operator); see hessmpi/solvers/rank.py. Writes
/rank_curve/* to --out and PNGs next to it (scripts/plot.py redraws them). With
--checkpoint FILE the finished batch sizes are saved and a run started again with the
same flags continues from them.
"""

import os
import sys
import time

from hessmpi import cli
from hessmpi.solvers import batch_rank, rank


def main():
    started = time.perf_counter()
    ours, petsc_args = cli.split_argv(sys.argv[1:])
    comm = cli.world()
    with cli.all_ranks(comm):
        parser = cli.common_parser(__doc__.splitlines()[0], "results/rank_curve.h5")
        parser.add_argument("--batch-sizes", default=None, metavar="N1,N2,...",
                            help="comma-separated batch sizes (default "
                                 f"{','.join(map(str, rank.DEFAULT_BATCH_SIZES))}, those above the available "
                                 "samples replaced by the available count)")
        parser.add_argument("--tol", type=float, default=None,
                            help="rank tolerance relative to max|λ| (default n·ε, n the matrix size: ε of float64 "
                                 "for the dense route, of --dtype for the matrix-free route)")
        parser.add_argument("--method", default="auto", choices=batch_rank.METHODS,
                            help="auto: dense for softmax (exact), matrix-free otherwise")
        parser.add_argument("--regularization", default="none", choices=("none", "l2", "laplacian"),
                            help="analyse H + γR (R: identity, or the Laplacian penalty of the softmax weight images)")
        parser.add_argument("--gamma", type=float, default=1e-4, help="γ of H + γR (default 1e-4)")
        parser.add_argument("--max-rank", type=int, default=None,
                            help="largest range basis of the matrix-free route (default: what 4 GiB holds, at most "
                                 "the matrix size); a batch whose rank exceeds it gets a lower bound and larger "
                                 "batches are skipped")
        parser.add_argument("--n-vectors", type=int, default=4,
                            help="top eigenvectors stored for the largest batch (dense route)")
        parser.add_argument("--checkpoint", default=None, metavar="FILE",
                            help="save the finished batch sizes to FILE and resume from it if it exists (a job "
                                 "stopped by its time limit or by SIGTERM/SIGUSR1 continues when run again)")
        args = parser.parse_args(ours)
        rank.parse_batch_sizes(args.batch_sizes, None)  # a malformed list fails before the slow set-up
        cli.init_petsc(petsc_args)
        cli.check_petsc_options(bv="rank_", eps="hess_norm_")  # a misspelt option fails now
        problem, op, _ = cli.problem_from_args(args, comm)
        settings = dict(batch_sizes=args.batch_sizes, method=args.method, regularization=args.regularization,
                        gamma=args.gamma, tol=args.tol, max_rank=args.max_rank, n_vectors=args.n_vectors)
        batch_rank.plan(op, **settings)
    cli.say(cli.describe_run(args, problem, comm))
    op.on_matvec = cli.progress_printer()
    curve = batch_rank.rank_curve(op, seed=args.seed, checkpoint=args.checkpoint, **settings)
    curve.attrs.update(cli.run_attrs(args, started))
    written = [curve.save(args.out)]
    if comm.Get_rank() == 0 and not args.no_plot:
        written += curve.plot(os.path.splitext(args.out)[0])
    cli.say("wrote " + ", ".join(written))


if __name__ == "__main__":
    cli.main_guard(main)
