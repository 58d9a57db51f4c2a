#!/usr/bin/env python3
"""Train softmax or cnn on the distributed data: regularized Newton-CG, LRSFN, or SGD/Adam/RMSprop.

    mpirun -n 4 python scripts/newton.py --method newton --gamma 1e-3 -newton_ksp_monitor
    mpirun -n 4 python scripts/newton.py --model cnn --method adam --iterations 2000 --resume

Every method minimizes F(θ) = mean training loss + γ/2·θᵀRθ (--regularization: R = I,
or the Laplacian of the softmax weight images). One row of history per recorded
iterate goes to /newton/* (loss = F, grad_norm = ‖∇F‖, accuracies, KSP iterations and
reason, step, HVPs, data sweeps, wall time), θ to /model/params. The results file is
rewritten atomically at every row and doubles as the checkpoint: --resume continues a
killed run from its last row and ends where an uninterrupted run would.
"""

import json
import math
import os
import sys

from hessmpi import cli, petsc_options
from hessmpi.errors import NumericalError

METHODS = ("newton", "lrsfn", "sgd", "adam", "rmsprop")
DEFAULT_ITERATIONS = {"newton": 20, "lrsfn": 100, "sgd": 1000, "adam": 1000, "rmsprop": 1000}


def parse(argv):
    parser = cli.common_parser(__doc__.splitlines()[0], "results/newton.h5")
    parser.epilog = ("Any PETSc/SLEPc option may follow: -newton_ksp_type cg -newton_ksp_monitor "
                     "-newton_ksp_max_it 200 -lrsfn_eps_monitor.")
    parser.add_argument("--method", default="newton", choices=METHODS)
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
    if args.iterations is None:
        args.iterations = DEFAULT_ITERATIONS[args.method]
    if args.method == "lrsfn" and args.hessian_batch is None:
        args.hessian_batch = 100
    if args.preconditioner != "none" and args.method != "newton":
        raise cli.HessmpiError(f"--preconditioner applies to --method newton, not {args.method}")
    if args.hessian_batch is not None and args.method not in ("newton", "lrsfn"):
        raise cli.HessmpiError(f"--hessian-batch applies to --method newton and lrsfn, not {args.method}")
    if args.hessian_batch is not None and args.hessian_batch < 1:
        raise cli.HessmpiError(f"--hessian-batch must be at least 1 (omit it for exact Newton), "
                               f"got {args.hessian_batch}")
    if (args.grow_from is not None or args.grow_factor is not None) and args.method != "newton":
        raise cli.HessmpiError(f"--grow-from and --grow-factor apply to --method newton, not {args.method}")
    if args.grow_factor is not None and args.grow_from is None:
        raise cli.HessmpiError("--grow-factor needs --grow-from (the first sample size)")
    if args.grow_from is not None:
        n = args.n_samples
        if args.grow_from < 1 or (n is not None and args.grow_from > n):
            raise cli.HessmpiError(f"--grow-from must be between 1 and the number of training samples"
                                   f"{f' ({n:,})' if n is not None else ''}, got {args.grow_from}")
        if args.grow_factor is None:
            args.grow_factor = 4.0
        elif not (math.isfinite(args.grow_factor) and args.grow_factor > 1):
            raise cli.HessmpiError(f"--grow-factor must be a finite number > 1, got {args.grow_factor}")
    if args.damping is None:
        args.damping = 1.0 if args.method == "lrsfn" else 0.0
    elif args.method not in ("newton", "lrsfn"):
        raise cli.HessmpiError(f"--damping applies to --method newton and lrsfn, not {args.method}")
    # --operator (common flag) picks Newton's curvature matrix; training needs all of θ.
    args.operator = getattr(args, "operator", "hessian")
    if getattr(args, "layer", None):
        raise cli.HessmpiError("--layer restricts an analysis to one layer's block; a training run "
                               "updates all parameters")
    if args.operator != "hessian" and args.method != "newton":
        raise cli.HessmpiError(f"--operator {args.operator} applies to --method newton only "
                               "(lrsfn is saddle-free Newton on the Hessian)")
    if args.record_every is None:
        args.record_every = max(1, args.iterations // 50) if args.method in ("sgd", "adam", "rmsprop") else 1
    for name in ("iterations", "record_every"):
        if getattr(args, name) < 1:
            raise cli.HessmpiError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.stop_after is not None and args.stop_after < 0:
        raise cli.HessmpiError(f"--stop-after must be at least 0, got {args.stop_after}")
    if not 0 < args.eta_max < 1:
        raise cli.HessmpiError(f"--eta-max must be in (0, 1), got {args.eta_max}")
    if args.method == "newton" and args.gamma == 0 and args.model == "softmax":
        cli.say("warning: --gamma 0: the softmax Hessian is singular and the optimum may not exist")
    return args


def run_config(args) -> dict:
    """The settings a resumed run must share with the run that wrote the checkpoint."""
    keys = ["method", "model", "dataset", "n_samples", "weights", "dtype", "seed", "micro_batch", "hvp_mode",
            "regularization", "gamma", "record_every", "n_test"]
    keys += {"newton": ["eta_max", "ew_alpha", "operator", "hessian_batch", "damping", "preconditioner",
                        "grow_from", "grow_factor"],
             "lrsfn": ["lr", "batch_size", "hessian_batch", "rank", "damping", "eig_tol"]}.get(
        args.method, ["lr", "batch_size"])
    return {k: getattr(args, k) for k in keys}


def make_method(args, objective, problem):
    from hessmpi import training

    if args.method == "newton":
        from hessmpi.newton import NewtonCG

        batches = (training.LocalBatches.of(problem, args.micro_batch)
                   if args.hessian_batch or args.preconditioner != "none" or args.grow_from else None)
        return NewtonCG(objective, eta_max=args.eta_max, ew_alpha=args.ew_alpha, curvature=args.operator,
                        batches=batches, hessian_batch=args.hessian_batch, seed=args.seed,
                        damping=args.damping, preconditioner=args.preconditioner,
                        grow_from=args.grow_from, grow_factor=args.grow_factor or 4.0)
    batches = training.LocalBatches.of(problem, args.micro_batch)
    if args.method == "lrsfn":
        from hessmpi.lrsfn import LowRankSaddleFreeNewton

        return LowRankSaddleFreeNewton(objective, batches, args.seed, rank=args.rank,
                                       batch_size=args.batch_size, hessian_batch=args.hessian_batch,
                                       damping=args.damping, learning_rate=args.lr or 1.0, tol=args.eig_tol)
    from hessmpi.first_order import KerasOptimizer

    return KerasOptimizer(args.method, objective, batches, args.seed, args.batch_size, args.lr)


def progress(history, method_name):
    from hessmpi.newton import reason_name

    r = {f: history.last(f) for f in history.rows}
    ksp = (f"  ksp {int(r['ksp_iterations']):4d} {reason_name(r['ksp_reason']):<24}"
           if method_name == "newton" and r["iteration"] > 0 else "")
    cli.say(f"{int(r['iteration']):6d}  F {r['loss']:.12e}  |g| {r['grad_norm']:.3e}  "
            f"train {r['train_accuracy']:.4f}  test {r['test_accuracy']:.4f}{ksp}  "
            f"step {r['step_length']:.2e}  HVPs {int(r['hvps']):6d}  sweeps {r['sweeps']:9.2f}  "
            f"{r['wall_time']:7.1f} s")


def main():
    ours, petsc_args = cli.split_argv(sys.argv[1:])
    comm = cli.world()
    with cli.all_ranks(comm):
        args = parse(ours)
        cli.init_petsc(petsc_args)
        petsc_options.check_petsc_options(ksp="newton_", eps=("lrsfn_", "hess_norm_"))  # a misspelt option fails now
        from hessmpi import training

        problem, theta = cli.problem_from_args(args, comm)
        cost = training.Cost()
        objective = training.Objective(problem, args.regularization, args.gamma, cost,
                                       test=training.held_out_curvature(problem, args.n_test, args.micro_batch))
        method = make_method(args, objective, problem)
        config = run_config(args)
        history = training.History()
        resumed = args.resume and os.path.exists(args.out)
        if resumed:
            theta, history, state, _ = training.load_checkpoint(args.out, config, comm)
            method.restore(state)
            cost.restore(history)
    from hessmpi import results, training, training_plots

    if args.method == "newton" and not args.hessian_batch:  # long solves report their progress
        method.full.on_matvec = cli.progress_printer()
    record = cli.RunRecord(args, comm, problem.n_params, problem.n_samples)
    cli.say(cli.describe_run(args, problem, comm))
    cli.say(f"method {args.method}: F = mean loss + {args.gamma:g}/2·θᵀRθ (R: {args.regularization}); "
            + (f"resuming at iteration {int(history.last('iteration'))} of {args.out}" if resumed
               else f"{args.iterations} iterations"))

    def attrs(finished, reason=""):
        extra = {"n_matvecs": cost.hvps, "iterations": int(history.last("iteration")),
                 "converged": int(reason == "gtol"),
                 "finished": int(finished), "stop_reason": reason, "method": args.method,
                 "regularization": args.regularization, "gamma": args.gamma, "sweeps": cost.sweeps,
                 "method_seconds": cost.seconds, "config": json.dumps(config),
                 "compute_seconds": problem.hessian.compute_seconds, "comm_seconds": problem.hessian.comm_seconds}
        return record.finish(**extra)

    def checkpoint(theta, history):
        a = attrs(False)
        if comm.Get_rank() == 0:
            training.save(args.out, theta, history, method.state(), a)

    try:
        theta, reason = training.run(method, objective, theta, history, args.iterations, args.record_every,
                                     args.stop_after, args.gtol if args.method == "newton" else 0.0,
                                     checkpoint, lambda h: progress(h, args.method))
    except NumericalError as error:
        # Divergence is found on all-reduced or replicated values, so every rank is here:
        # one message, status 2 everywhere, and nothing written after the last checkpoint.
        with cli.all_ranks(comm):
            raise error
    finished = reason != "stopped"
    final = attrs(finished, reason)
    # PETSc objects are destroyed collectively, before rank 0 alone writes and plots.
    if hasattr(method, "destroy"):
        method.destroy()
    if comm.Get_rank() == 0:
        training.save(args.out, theta, history, method.state(), final)
        written = [args.out]
        if not args.no_plot:
            png = os.path.splitext(args.out)[0] + ".png"
            datasets, _ = results.read(args.out)
            training_plots.history(datasets, final, png)
            written.append(png)
        cli.say(f"{reason}: F {history.last('loss'):.12e}, |g| {history.last('grad_norm'):.3e}, "
                f"test accuracy {history.last('test_accuracy'):.4f} after {cost.sweeps:.1f} sweeps; "
                f"wrote {', '.join(written)}")
    if not finished:
        cli.say(f"stopped after {args.stop_after} iterations (--stop-after); continue with --resume")


if __name__ == "__main__":
    cli.main_guard(main)
