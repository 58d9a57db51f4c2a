"""What every script shares: flags, PETSc options, the error policy, progress, the run record.

Flags with two dashes are the script's (argparse); options with one dash
(`-hess_eps_type lanczos`) go to PETSc/SLEPc untouched.

Error policy: set-up runs on every rank inside `all_ranks`, which gathers every
rank's outcome, so a bad flag or file gives one message from rank 0 and exit status
2 on every rank. After set-up, an exception on any rank prints that rank's message
and aborts the whole MPI job, so no rank is left waiting in a collective.

The inputs are checked before TensorFlow starts (`check_inputs`), so a bad one ends
the job in about a second. PETSc options that no solver reads are reported before the
solve and at exit (`hessmpi.petsc_options`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
import traceback

from . import petsc_options
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
    """The flags every analysis script accepts (DESIGN.md, contract). default_out is the
    default --out; "unused" marks a script that writes no results file (its --out is not
    checked)."""
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
    p.set_defaults(writes_results=default_out != "unused")
    return p


def init_petsc(petsc_args: list[str]) -> None:
    """Start PETSc and SLEPc with the PETSc options of the command line."""
    from mpi4py import MPI  # noqa: F401  (MPI is initialised by mpi4py, finalised after PETSc)
    import petsc4py
    import slepc4py

    argv = [sys.argv[0]] + petsc_args
    petsc4py.init(argv)
    slepc4py.init(argv)
    petsc_options.report_unused_at_exit()


def world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def say(*parts) -> None:
    """Print on rank 0 only, flushed (progress of long runs)."""
    if world().Get_rank() == 0:
        print(*parts, flush=True)


@contextlib.contextmanager
def all_ranks(comm, exit: bool = True):
    """Run a block on every rank; if it raised anywhere, every rank exits with one message.

    A HessmpiError exits with status 2 and its message; any other exception with
    status 1 and its traceback. Rank 0 prints the first failing rank's message.
    With exit=False every rank raises instead the same collective HessmpiError holding
    that message, for a caller that is itself inside all_ranks (or a test).
    """
    outcome = None
    try:
        yield
    except HessmpiError as e:
        outcome = (2, str(e))
    except Exception:
        outcome = (1, traceback.format_exc())
    outcomes = comm.allgather(outcome)
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if failed:
        rank, (code, message) = failed[0]
        where = f"[rank {rank}] " if len(failed) < comm.Get_size() else ""
        if not exit:
            raise HessmpiError(f"{where}{message}".rstrip(), collective=True)
        if comm.Get_rank() == 0:
            print(f"{where}{'error: ' if code == 2 else ''}{message}".rstrip(), file=sys.stderr, flush=True)
        raise SystemExit(code)


def main_guard(main) -> None:
    """Run main() with the error policy: an exception outside `all_ranks` aborts the job,
    except a collective HessmpiError (raised by every rank at once, e.g. a non-finite
    product): rank 0 prints it and every rank exits with status 2."""
    comm = None
    try:
        comm = world()
        main()
        petsc_options.run_finished()
    except SystemExit:
        raise
    except BaseException as e:
        rank = comm.Get_rank() if comm is not None else 0
        size = comm.Get_size() if comm is not None else 1
        if isinstance(e, HessmpiError) and e.collective:  # every rank raised it: one message, no abort
            if rank == 0:
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            comm.Barrier()
            # At once: PETSc's finalization would trip over the state the error left a
            # solver in (e.g. an EPS interrupted mid-iteration) and print its traceback.
            os._exit(2)
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


def check_inputs(args, comm, check=None):
    """(model, dataset, θ) of the common flags, every check that needs no TensorFlow done.

    Checks, in this order: --micro-batch, --model/--layer, the data files, --n-samples,
    --weights (length, key, finite), --nev and --batch-sizes where the script has them
    (1 ≤ nev < the operator's size; sizes within the samples), on rank 0 the output
    file (--out writable; not there unless --overwrite, or --resume where the script has
    it), then check(n_samples) if given (the script's own checks that need the number of
    samples the run uses; they raise HessmpiError), and on rank 0 the folder of
    --checkpoint where the script has it (exists or can be made, writable). The ranks
    agree on the outcome before returning (one `all_ranks` round): a bad input raises the
    same HessmpiError on every rank in about a second, and no rank goes on into a
    collective set-up. Call on every rank.
    """
    from . import data, results
    from .models import get_model
    from .operator import layer_block

    model = dataset = theta = None
    with all_ranks(comm, exit=False):
        if args.micro_batch < 1:
            raise HessmpiError(f"--micro-batch must be at least 1, got {args.micro_batch}")
        model = get_model(args.model)
        block = layer_block(model, args.layer) if getattr(args, "layer", None) else slice(0, model.n_params)
        size = block.stop - block.start  # the operator's size
        dataset = data.load(args.dataset, args.data_dir, seed=args.seed)
        if args.n_samples is not None and not 1 <= args.n_samples <= dataset.n_train:
            raise HessmpiError(f"--n-samples {args.n_samples} is out of range: {args.dataset} has "
                               f"{dataset.n_train:,} training samples (use 1..{dataset.n_train})")
        theta = (results.load_weights(args.weights, model.n_params) if args.weights
                 else model.init(args.seed))
        nev = getattr(args, "nev", None)
        if nev is not None and not 1 <= nev < size:
            raise HessmpiError(f"--nev must be between 1 and {size - 1}, got {nev}")
        n_samples = args.n_samples or dataset.n_train
        if getattr(args, "batch_sizes", None) is not None:
            from .rank import parse_batch_sizes

            parse_batch_sizes(args.batch_sizes, n_samples)
        if getattr(args, "writes_results", False) and comm.Get_rank() == 0:
            resume = getattr(args, "resume", None)
            if resume is False and os.path.exists(args.out) and not args.overwrite:
                raise HessmpiError(f"{args.out} exists: pass --resume to continue the run it holds, "
                                   "--overwrite to start over, or choose another --out")
            results.check_output(args.out, args.overwrite or bool(resume))
        if check is not None:
            check(n_samples)
        if getattr(args, "checkpoint", None) and comm.Get_rank() == 0:
            results.check_output(args.checkpoint, overwrite=True)  # its folder exists and is writable
    return model, dataset, theta


def problem_from_args(args, comm, check=None):
    """The Problem and starting θ that the common flags describe, validated; call inside
    all_ranks, on every rank. The inputs are checked first (`check_inputs`, about a
    second, with the script's own check(n_samples) if given); TensorFlow starts only once
    they are all good."""
    import numpy as np

    from . import runtime

    model, dataset, theta = check_inputs(args, comm, check)
    runtime.configure_threads(runtime.default_threads(comm))
    from .problem import Problem

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
    """The attributes every results file carries (DESIGN.md), filled as the run goes,
    plus the curvature matrix analysed: `operator` ("hessian" or "ggn") and `layer`
    (the --layer name, "" for all of θ)."""

    def __init__(self, args, comm, n_params: int, n_samples: int):
        from . import __version__

        self.t0 = time.perf_counter()
        self.attrs = {
            "model": args.model, "dataset": args.dataset, "n_params": n_params,
            "n_samples": n_samples, "n_ranks": comm.Get_size(), "dtype": args.dtype,
            "hessmpi_version": __version__, "seed": args.seed,
            "weights": args.weights or "init",
            "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv),
            "operator": getattr(args, "operator", "hessian"), "layer": getattr(args, "layer", None) or "",
        }

    def finish(self, **stats) -> dict:
        self.attrs.update(stats)
        self.attrs["wall_time"] = time.perf_counter() - self.t0
        return self.attrs


def write_results(args, datasets: dict, attrs: dict, plot=None) -> list[str]:
    """On the calling rank (call it on rank 0 only): write datasets and attrs to args.out
    atomically, then, unless --no-plot, plot(datasets, attrs, png) to the PNG next to it;
    say what was written and return those paths."""
    from . import results

    results.write(args.out, datasets, attrs)
    written = [args.out]
    if plot is not None and not args.no_plot:
        png = os.path.splitext(args.out)[0] + ".png"
        plot(datasets, attrs, png)
        written.append(png)
    say("wrote " + ", ".join(written))
    return written
