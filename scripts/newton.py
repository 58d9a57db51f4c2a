#!/usr/bin/env python3
"""Train softmax or cnn (or your Keras model) on the distributed data: regularized Newton-CG, LRSFN, or SGD/Adam/RMSprop.

    mpirun -n 4 python scripts/newton.py --method newton --gamma 1e-3 -newton_ksp_monitor
    mpirun -n 4 python scripts/newton.py --model cnn --method adam --iterations 2000 --resume

Every method minimizes F(θ) = mean training loss + γ/2·θᵀRθ (--regularization: R = I,
or the Laplacian of the softmax weight images). One row of history per recorded
iterate goes to /newton/* (loss = F, grad_norm = ‖∇F‖, accuracies, KSP iterations and
reason, step, HVPs, data sweeps, wall time), θ and its layout to /model/*. The results
file is rewritten atomically at every row and doubles as the checkpoint: --resume
continues a killed run from its last row and ends where an uninterrupted run would.
"""

import os
import sys

from hessmpi import cli
from hessmpi.optim import fit


def parse(argv):
    parser = cli.common_parser(__doc__.splitlines()[0], "results/newton.h5")
    parser.epilog = ("Any PETSc/SLEPc option may follow: -newton_ksp_type cg -newton_ksp_monitor "
                     "-newton_ksp_max_it 200 -lrsfn_eps_monitor.")
    parser.add_argument("--method", default="newton", choices=fit.METHODS)
    parser.add_argument("--regularization", default="l2", choices=("l2", "laplacian"),
                        help="R in γ/2·θᵀRθ: identity, or (LᵀL)⊗I₁₀ on the softmax weight images")
    parser.add_argument("--gamma", type=float, default=1e-3, help="regularization weight γ (default 1e-3)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="Newton/LRSFN iterations or optimizer steps (default newton 20, lrsfn 100, "
                             "sgd/adam/rmsprop 1000)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run checkpointed in --out (start afresh if there is none)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many iterations of this process, as if killed (tests resume)")
    parser.add_argument("--record-every", type=int, default=None,
                        help="record (and checkpoint) every K iterations (default 1; for "
                             "sgd/adam/rmsprop iterations/50)")
    parser.add_argument("--n-test", type=int, default=None, help="first N test samples for the test accuracy "
                        "(default all)")
    parser.add_argument("--gtol", type=float, default=1e-10,
                        help="newton: stop when ‖∇F‖ is at most this (default 1e-10)")
    parser.add_argument("--eta-max", type=float, default=0.5, help="newton: largest KSP relative tolerance")
    parser.add_argument("--ew-alpha", type=float, default=2.0,
                        help="newton: Eisenstat–Walker exponent, KSP rtol ≈ 0.9·(‖g_k‖/‖g_k−1‖)^α "
                             "(2: quadratic, 1.618: PETSc's default)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default sgd 0.5, adam/rmsprop 1e-3, lrsfn 1)")
    parser.add_argument("--batch-size", type=int, default=100, help="gradient mini-batch (sgd/adam/rmsprop/lrsfn)")
    parser.add_argument("--hessian-batch", type=int, default=None,
                        help="curvature of a seeded mini-batch of this size per iteration (lrsfn: default "
                             "100; newton: sub-sampled Newton, default all samples, i.e. exact Newton)")
    parser.add_argument("--preconditioner", default="none", choices=("none", "kronecker"),
                        help="newton, softmax: precondition the KSP with (S⊗Ā + γR + σI)⁻¹, S the pixel "
                             "second moments of all images, Ā the mean softmax Hessian of the curvature "
                             "samples (default none)")
    parser.add_argument("--grow-from", type=int, default=None,
                        help="newton: dynamic sample size: iteration k uses only the first "
                             "n_k = min(N, n₀·c^k) training samples (F, ∇F, line search, curvature), "
                             "n₀ this (default all N from the start)")
    parser.add_argument("--grow-factor", type=float, default=None,
                        help="newton, with --grow-from: the growth factor c of the sample size (default 4)")
    parser.add_argument("--rank", type=int, default=40, help="lrsfn: eigenpairs kept")
    parser.add_argument("--damping", type=float, default=None,
                        help="lrsfn: δ in (|Λ|+δ)⁻¹ and δ⁻¹(I−VVᵀ) (default 1); newton: σ in the step "
                             "(H + γR + σI)p = −∇F (Levenberg–Marquardt, default 0)")
    parser.add_argument("--eig-tol", type=float, default=1e-2, help="lrsfn: SLEPc relative tolerance")
    args = parser.parse_args(argv)
    if args.layer:
        raise cli.HessmpiError("--layer restricts an analysis to one layer's block; a training run "
                               "updates all parameters")
    if args.stop_after is not None and args.stop_after < 0:
        raise cli.HessmpiError(f"--stop-after must be at least 0, got {args.stop_after}")
    settings = dict(regularization=args.regularization, gamma=args.gamma, iterations=args.iterations,
                    record_every=args.record_every, seed=args.seed, gtol=args.gtol, eta_max=args.eta_max,
                    ew_alpha=args.ew_alpha, curvature=args.operator, lr=args.lr, batch_size=args.batch_size,
                    hessian_batch=args.hessian_batch, preconditioner=args.preconditioner, grow_from=args.grow_from,
                    grow_factor=args.grow_factor, rank=args.rank, damping=args.damping, eig_tol=args.eig_tol)
    fit.Settings(method=args.method, **settings).check(args.n_samples)  # a bad combination fails now
    if args.method == "newton" and args.gamma == 0 and args.model == "softmax":
        cli.say("warning: --gamma 0: the softmax Hessian is singular and the optimum may not exist")
    return args, settings


def main():
    ours, petsc_args = cli.split_argv(sys.argv[1:])
    comm = cli.world()
    with cli.all_ranks(comm):
        args, settings = parse(ours)
        cli.init_petsc(petsc_args)
        cli.check_petsc_options(ksp="newton_", eps=("lrsfn_", "hess_norm_"))  # a misspelt option fails now
        problem, op, test = cli.problem_from_args(args, comm)
        if test is not None and args.n_test is not None and not 1 <= args.n_test <= test.n:
            raise cli.HessmpiError(f"--n-test {args.n_test} is out of range: {test.name} has {test.n:,} test "
                                   f"samples (use 1..{test.n})")
    cli.say(cli.describe_run(args, problem, comm))
    op.on_matvec = cli.progress_printer()
    run = fit.train(op, args.method, test=test, n_test=args.n_test, checkpoint=args.out, resume=args.resume,
                    stop_after=args.stop_after, attrs={"seed": args.seed, "weights": cli.weights_of(args)},
                    config={"weights": args.weights}, **settings)  # it writes --out at every row and at the end
    written = [args.out]
    if comm.Get_rank() == 0 and not args.no_plot:
        png = os.path.splitext(args.out)[0] + ".png"
        run.plot(png)
        written.append(png)
    h = run.history
    cli.say(f"{run.reason}: F {h.last('loss'):.12e}, |g| {h.last('grad_norm'):.3e}, test accuracy "
            f"{h.last('test_accuracy'):.4f} after {h.last('sweeps'):.1f} sweeps; wrote {', '.join(written)}")
    if not run.finished:
        cli.say(f"stopped after {args.stop_after} iterations (--stop-after); continue with --resume")


if __name__ == "__main__":
    cli.main_guard(main)
