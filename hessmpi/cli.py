"""What every script shares: flags, PETSc options, the error policy, progress, the run record.

Flags with two dashes are the script's (argparse); options with one dash
(`-hess_eps_type lanczos`) go to PETSc/SLEPc untouched.

Error policy: set-up runs on every rank inside `all_ranks`, which gathers every
rank's outcome, so a bad flag or file gives one message from rank 0 and exit status
2 on every rank. After set-up, an exception on any rank prints that rank's message
and aborts the whole MPI job, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
import traceback

from .errors import HessmpiError

DATASET_CHOICES = ("mnist-5k", "mnist", "fashion-mnist", "synthetic")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(script flags, PETSc options): a token with one leading dash and a letter starts a
    PETSc option, and the tokens after it up to the next option are its values."""
    ours, petsc = [], []
    target = ours
    for tok in argv:
        if tok.startswith("--") or tok == "-h":
            target = ours
        elif tok.startswith("-") and len(tok) > 1 and tok[1].isalpha():
            target = petsc
        target.append(tok)
    return ours, petsc


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are HessmpiErrors (printed once, by rank 0)."""

    def error(self, message):
        raise HessmpiError(f"{message}\n{self.format_usage().strip()}")

    def _print_message(self, message, file=None):
        if world().Get_rank() == 0:  # --help once, not once per rank
            super()._print_message(message, file)


def common_parser(description: str, default_out: str) -> ArgumentParser:
    """The flags every analysis script accepts (DESIGN.md, contract)."""
    p = ArgumentParser(description=description, allow_abbrev=False,
                       epilog="Any PETSc/SLEPc option may follow, e.g. -hess_eps_type lanczos -hess_eps_monitor.")
    p.add_argument("--model", default="softmax", choices=("softmax", "cnn"))
    p.add_argument("--dataset", default="mnist-5k", choices=DATASET_CHOICES)
    p.add_argument("--data-dir", default=None, help="folder of the dataset's files (IDX for mnist/fashion-mnist)")
    p.add_argument("--n-samples", type=int, default=None,
                   help="use the first N training samples in canonical order (default: all)")
    p.add_argument("--weights", default=None, help=".npz with key 'params', or a results file with /model/params "
                   "(default: the model's initialisation)")
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"),
                   help="TensorFlow compute precision (PETSc works in float64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and random start vectors")
    p.add_argument("--out", default=default_out, help=f"results file (default {default_out})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing results file")
    p.add_argument("--micro-batch", type=int, default=1000, help="samples per TensorFlow call (bounds memory)")
    p.add_argument("--hvp-mode", default="reverse-over-reverse",
                   choices=("reverse-over-reverse", "forward-over-reverse"))
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG next to the results file")
    p.add_argument("--operator", default="hessian", choices=("hessian", "ggn"),
                   help="the curvature matrix to analyse: the Hessian or the generalized Gauss-Newton matrix")
    p.add_argument("--layer", default=None, metavar="NAME",
                   help="analyse only this layer's diagonal block of the matrix, e.g. conv1 or "
                        "dense2/kernel (names from the model's layout; default: all parameters)")
    return p


def init_petsc(petsc_args: list[str]) -> None:
    """Start PETSc and SLEPc with the PETSc options of the command line."""
    from mpi4py import MPI  # noqa: F401  (MPI is initialised by mpi4py, finalised after PETSc)
    import petsc4py
    import slepc4py

    argv = [sys.argv[0]] + petsc_args
    petsc4py.init(argv)
    slepc4py.init(argv)


def world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def say(*parts) -> None:
    """Print on rank 0 only, flushed (progress of long runs)."""
    if world().Get_rank() == 0:
        print(*parts, flush=True)


@contextlib.contextmanager
def all_ranks(comm):
    """Run a block on every rank; if it raised anywhere, every rank exits with one message.

    A HessmpiError exits with status 2 and its message; any other exception with
    status 1 and its traceback. Rank 0 prints the first failing rank's message.
    """
    outcome = None
    try:
        yield
    except HessmpiError as e:
        outcome = (2, f"error: {e}")
    except Exception:
        outcome = (1, traceback.format_exc())
    outcomes = comm.allgather(outcome)
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if failed:
        rank, (code, message) = failed[0]
        if comm.Get_rank() == 0:
            where = f"[rank {rank}] " if len(failed) < comm.Get_size() else ""
            print(f"{where}{message}".rstrip(), file=sys.stderr, flush=True)
        raise SystemExit(code)


def main_guard(main) -> None:
    """Run main() with the error policy: an exception outside `all_ranks` aborts the job."""
    comm = None
    try:
        comm = world()
        main()
    except SystemExit:
        raise
    except BaseException as e:
        rank = comm.Get_rank() if comm is not None else 0
        size = comm.Get_size() if comm is not None else 1
        if isinstance(e, HessmpiError):
            text, code = f"error: {e}", 2
        elif isinstance(e, KeyboardInterrupt):
            text, code = "interrupted", 130
        else:
            text, code = traceback.format_exc().rstrip(), 1
        prefix = f"[rank {rank}] " if size > 1 else ""
        print(f"{prefix}{text}", file=sys.stderr, flush=True)
        if size > 1:
            comm.Abort(code)
        raise SystemExit(code)


def problem_from_args(args, comm):
    """The Problem and starting θ that the common flags describe, validated; call inside all_ranks."""
    import numpy as np

    from . import data, results, runtime
    from .models import get_model

    if getattr(args, "layer", None):
        from .operator import layer_block

        layer_block(get_model(args.model), args.layer)  # a bad name fails at once, before TensorFlow starts
    runtime.configure_threads(runtime.default_threads(comm))
    from .problem import Problem

    if args.micro_batch < 1:
        raise HessmpiError(f"--micro-batch must be at least 1, got {args.micro_batch}")
    model = get_model(args.model)
    dataset = data.load(args.dataset, args.data_dir, seed=args.seed)
    if args.n_samples is not None and not 1 <= args.n_samples <= dataset.n_train:
        raise HessmpiError(f"--n-samples {args.n_samples} is out of range: {args.dataset} has "
                           f"{dataset.n_train:,} training samples (use 1..{dataset.n_train})")
    theta = (results.load_weights(args.weights, model.n_params) if args.weights
             else model.init(args.seed))
    problem = Problem(model, dataset, args.n_samples, comm, args.dtype, args.micro_batch, args.hvp_mode,
                      operator=getattr(args, "operator", "hessian"), layer=getattr(args, "layer", None))
    problem.set_params(theta)
    return problem, np.asarray(theta)


def describe_run(args, problem, comm) -> str:
    from . import __version__, runtime

    return (f"hessmpi {__version__}: {problem.model.describe()}; {args.dataset}, "
            f"{problem.n_samples:,} samples over {comm.Get_size()} rank(s); {args.dtype}; "
            f"{runtime.configure_threads(1)} TensorFlow thread(s) per rank; "
            f"weights: {args.weights or f'initialisation (seed {args.seed})'}")


def progress_printer(every: float = 10.0):
    """An operator callback that prints the product count on rank 0 every `every` seconds."""
    state = {"t0": time.perf_counter(), "last": time.perf_counter()}

    def on_matvec(op):
        now = time.perf_counter()
        if now - state["last"] >= every:
            state["last"] = now
            say(f"  ... {op.n_matvecs} Hessian-vector products, {now - state['t0']:.0f} s")

    return on_matvec


class RunRecord:
    """The attributes every results file carries (DESIGN.md), filled as the run goes."""

    def __init__(self, args, comm, n_params: int, n_samples: int):
        from . import __version__

        self.t0 = time.perf_counter()
        self.attrs = {
            "model": args.model, "dataset": args.dataset, "n_params": n_params,
            "n_samples": n_samples, "n_ranks": comm.Get_size(), "dtype": args.dtype,
            "hessmpi_version": __version__, "seed": args.seed,
            "weights": args.weights or "init",
            "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv),
        }

    def finish(self, **stats) -> dict:
        self.attrs.update(stats)
        self.attrs["wall_time"] = time.perf_counter() - self.t0
        return self.attrs
