"""What every script shares: flags, PETSc options, the error policy, progress, the run record.

Flags with two dashes are the script's (argparse); options with one dash
(`-hess_eps_type lanczos`) go to PETSc/SLEPc untouched.

Error policy: set-up runs on every rank inside `all_ranks`, which gathers every
rank's outcome, so a bad flag or file gives one message from rank 0 and exit status
2 on every rank. After set-up, an exception on any rank prints that rank's message
and aborts the whole MPI job, so no rank is left waiting in a collective.

The inputs are checked before TensorFlow starts (`check_inputs`), so a bad one ends
the job in about a second. PETSc options that no solver reads are reported before the
solve (`check_petsc_options`) and, at exit, by PETSc's own -options_left listing.
"""

from __future__ import annotations

import argparse
import atexit
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
    atexit.register(_report_unused_options)  # runs before petsc4py's PetscFinalize


# Options that PETSc reads only at PetscFinalize or when something is drawn or viewed
# (after the solve): never reported as unused by check_petsc_options.
_READ_LATER = ("options_left", "options_view", "mpi_linear_solver_server_view", "nox", "nox_warning",
               "display", "draw_pause", "saws_port")
_READ_LATER_PARTS = ("view", "converged_reason", "viewer_", "draw_", "saws_")
_state = {"finished": False, "flagged": False}


def _petsc_library():
    """A ctypes handle on the PETSc library that petsc4py loaded, or None."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libpetsc" in line}
    except OSError:
        paths = set()
    for path in sorted(paths):
        name = os.path.basename(path)
        if name.startswith("libpetsc") and ".so" in name and not name.startswith("libpetsc4py"):
            try:
                return ctypes.CDLL(path)
            except OSError:
                pass
    return None


def unused_petsc_options() -> list[str] | None:
    """The options of PETSc's database that nothing has read so far on this rank, as
    "-name value" strings (PetscOptionsLeftGet); None if the library is out of reach."""
    import ctypes

    import numpy as np
    from petsc4py import PETSc

    lib = _petsc_library()
    if lib is None or not hasattr(lib, "PetscOptionsLeftGet"):
        return None
    count = (ctypes.c_int64 if np.dtype(PETSc.IntType).itemsize == 8 else ctypes.c_int32)(0)
    names, values = ctypes.POINTER(ctypes.c_char_p)(), ctypes.POINTER(ctypes.c_char_p)()
    args = (None, ctypes.byref(count), ctypes.byref(names), ctypes.byref(values))
    if lib.PetscOptionsLeftGet(*args) != 0:
        return None
    try:
        return [f"-{names[i].decode()}" + (f" {values[i].decode()}" if values[i] else "")
                for i in range(count.value)]
    finally:
        lib.PetscOptionsLeftRestore(*args)


def check_petsc_options(**prefixes) -> None:
    """Raise HessmpiError naming every PETSc option of the command line that the
    script's solvers will not read (a typo such as -hess_eps_tpye), before the solve.

    prefixes maps a SLEPc/PETSc object kind (eps, bv, ksp) to the options prefixes
    the script gives such objects, e.g. check_petsc_options(eps=("hess_", "hess_norm_")).
    An object of each kind and prefix is made on this rank and set from the options,
    which marks every option it understands as used; what is left is reported.
    Options read only at exit or when viewing (-options_left, -*_view*,
    -*_converged_reason) are not reported here; PETSc lists them at exit if they stay
    unused. Call on every rank after init_petsc, inside all_ranks.
    """
    from petsc4py import PETSc
    from slepc4py import SLEPc

    makers = {"eps": SLEPc.EPS, "bv": SLEPc.BV, "ksp": PETSc.KSP}
    for kind, names in prefixes.items():
        for prefix in ([names] if isinstance(names, str) else names):
            obj = makers[kind]().create(comm=PETSc.COMM_SELF)
            try:
                obj.setOptionsPrefix(prefix)
                obj.setFromOptions()
            finally:
                obj.destroy()
    left = unused_petsc_options() or []
    left = [opt for opt in left if not _read_later(opt)]
    if left:
        _state["flagged"] = True
        known = ", ".join(f"-{p} ({kind.upper()})" for kind, names in prefixes.items()
                          for p in ([names] if isinstance(names, str) else names))
        raise HessmpiError(f"unknown PETSc option{'s' if len(left) > 1 else ''} {', '.join(left)}: "
                           f"no solver of this script reads {'them' if len(left) > 1 else 'it'} "
                           f"(its options prefixes: {known}); check the spelling, -help lists the options")


def _read_later(option: str) -> bool:
    name = option.split()[0].lstrip("-")
    return name in _READ_LATER or any(part in name for part in _READ_LATER_PARTS)


def _report_unused_options() -> None:
    """At exit, after a run that finished or whose options were found wrong: if options
    stay unused, set -options_left so that PetscFinalize prints PETSc's own warning
    listing them (on rank 0). Optimized PETSc builds do not do this by default."""
    from petsc4py import PETSc

    if not (_state["finished"] or _state["flagged"]) or PETSc.Sys.isFinalized():
        return
    options = PETSc.Options()
    if options.hasName("options_left") or not unused_petsc_options():
        return  # the user's own -options_left decides, or nothing to report
    options.setValue("options_left", "1")


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
        _state["finished"] = True
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


def check_inputs(args, comm):
    """(model, dataset, θ) of the common flags, every check that needs no TensorFlow done.

    Checks, in this order: --micro-batch, --model/--layer, the data files, --n-samples,
    --weights (length, key, finite), --nev and --batch-sizes where the script has them
    (1 ≤ nev < the operator's size; sizes within the samples), and on rank 0 the output
    file (--out writable; not there unless --overwrite, or --resume where the script has
    it). The ranks agree on the outcome before returning (one `all_ranks` round): a bad
    input raises the same HessmpiError on every rank in about a second, and no rank goes
    on into a collective set-up. Call on every rank.
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
        if getattr(args, "batch_sizes", None) is not None:
            from .rank import parse_batch_sizes

            parse_batch_sizes(args.batch_sizes, args.n_samples or dataset.n_train)
        if getattr(args, "writes_results", False) and comm.Get_rank() == 0:
            resume = getattr(args, "resume", None)
            if resume is False and os.path.exists(args.out) and not args.overwrite:
                raise HessmpiError(f"{args.out} exists: pass --resume to continue the run it holds, "
                                   "--overwrite to start over, or choose another --out")
            results.check_output(args.out, args.overwrite or bool(resume))
    return model, dataset, theta


def problem_from_args(args, comm):
    """The Problem and starting θ that the common flags describe, validated; call inside
    all_ranks, on every rank. The inputs are checked first (`check_inputs`, about a
    second); TensorFlow starts only once they are all good."""
    import numpy as np

    from . import runtime

    model, dataset, theta = check_inputs(args, comm)
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
