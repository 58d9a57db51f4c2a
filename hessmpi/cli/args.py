"""The flags every script shares, PETSc options, and the inputs they describe, checked before TensorFlow starts.

Flags with two dashes are the script's (argparse); options with one dash
(`-hess_eps_type lanczos`) go to PETSc/SLEPc untouched. `check_inputs` runs every
check that needs no TensorFlow on every rank and makes the ranks agree, so a bad input
ends the job in about a second with one message; `problem_from_args` then loads the
model (TensorFlow starts) and builds the Problem, checking what needs the model.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

from .. import runtime
from ..errors import HessmpiError
from . import petsc_options
from .policy import all_ranks

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
        if runtime.world().Get_rank() == 0:  # --help once, not once per rank
            super()._print_message(message, file)


def common_parser(description: str, default_out: str) -> ArgumentParser:
    """The flags every analysis script accepts (the design's contract). default_out is the
    default --out; "unused" marks a script that writes no results file (its --out is not
    checked)."""
    p = ArgumentParser(description=description, allow_abbrev=False,
                       epilog="Any PETSc/SLEPc option may follow, e.g. -hess_eps_type lanczos -hess_eps_monitor.")
    p.add_argument("--model", default="softmax", metavar="{softmax,cnn,FILE.keras,module:function}",
                   help="a built-in model, a saved Keras model, or a function returning a built Keras model "
                        "(default softmax)")
    p.add_argument("--dataset", default="mnist-5k", choices=DATASET_CHOICES)
    p.add_argument("--data-dir", default=None, help="folder of the dataset's files (IDX for mnist/fashion-mnist)")
    p.add_argument("--data", default=None, metavar="FILE.npz",
                   help="your samples instead of --dataset: arrays x_train, y_train (optional x_test, y_test), "
                        "given to the model as they are")
    p.add_argument("--loss", default=None, metavar="NAME",
                   help="a Keras loss name (sparse_categorical_crossentropy, mse, huber, …), for a model "
                        "compiled without a loss (default: the model's compiled loss)")
    p.add_argument("--from-logits", action="store_true",
                   help="with --loss NAME of a cross-entropy: the model outputs logits")
    p.add_argument("--n-samples", type=int, default=None,
                   help="use the first N training samples in canonical order (default: all)")
    p.add_argument("--weights", default=None, help=".npz with key 'params', or a results file with /model/params "
                   "(default: a built-in model's initialisation, a Keras model's own weights)")
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"),
                   help="TensorFlow compute precision, whatever the model's own (PETSc works in float64)")
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
    """Start PETSc and SLEPc with the PETSc options of the command line; PETSc will list at
    exit the options nothing read."""
    runtime.init_petsc(petsc_args)
    petsc_options.report_unused_at_exit()


@dataclass
class Inputs:
    """What the common flags describe, checked without TensorFlow."""

    samples: object  # data.Data of the training samples
    test: object  # data.Data of the test samples, or None
    theta: object  # the --weights vector, or None
    size: int | None  # the analysed operator's size, when known before the model is loaded


def check_inputs(args, comm, check=None) -> Inputs:
    """The inputs of the common flags, every check that needs no TensorFlow done.

    Checks, in this order: --micro-batch, --model (a built-in name, a Keras file, or
    module:function) and --layer of a built-in model, the data (--data or --dataset),
    --n-samples, --weights (key, finite; its length for a built-in model), --nev and
    --batch-sizes where the script has them, on rank 0 the output file (--out writable;
    not there unless --overwrite, or --resume where the script has it), then
    check(n_samples) if given, and on rank 0 the folder of --checkpoint where the script
    has it. The ranks agree on the outcome (one `all_ranks` round): a bad input raises
    the same HessmpiError on every rank in about a second. Call on every rank.
    """
    from .. import results
    from ..models import builtin, loading

    inputs = None
    with all_ranks(comm, exit=False):
        if args.micro_batch < 1:
            raise HessmpiError(f"--micro-batch must be at least 1, got {args.micro_batch}")
        size = None
        if loading.kind_of(args.model) == "builtin":
            layout = builtin.layout(args.model)
            block = layout.block(args.layer) if args.layer else slice(0, layout.n_params)
            size = block.stop - block.start
        samples, test = _samples(args)
        theta = results.load_weights(args.weights) if args.weights else None
        if theta is not None and loading.kind_of(args.model) == "builtin":
            results.check_length(theta, builtin.layout(args.model).n_params, args.weights)
        nev = getattr(args, "nev", None)
        if nev is not None and size is not None and not 1 <= nev < size:
            raise HessmpiError(f"--nev must be between 1 and {size - 1}, got {nev}")
        if getattr(args, "batch_sizes", None) is not None:
            from ..solvers.rank import parse_batch_sizes

            parse_batch_sizes(args.batch_sizes, samples.n)
        if getattr(args, "writes_results", False) and comm.Get_rank() == 0:
            resume = getattr(args, "resume", None)
            if resume is False and os.path.exists(args.out) and not args.overwrite:
                raise HessmpiError(f"{args.out} exists: pass --resume to continue the run it holds, "
                                   "--overwrite to start over, or choose another --out")
            results.check_output(args.out, args.overwrite or bool(resume))
        if check is not None:
            check(samples.n)
        if getattr(args, "checkpoint", None) and comm.Get_rank() == 0:
            results.check_output(args.checkpoint, overwrite=True)  # its folder exists and is writable
        inputs = Inputs(samples, test, theta, size)
    return inputs


def _samples(args):
    """(training samples, test samples or None) of --data or --dataset, the first --n-samples."""
    from .. import data

    if args.data:
        train = data.load_npz(args.data, "train")
        test = data.load_npz(args.data, "test") if data.samples.has_split(args.data, "test") else None
        return data.as_samples(train, args.n_samples), test
    dataset = data.load(args.dataset, args.data_dir, seed=args.seed)
    return dataset.split("train", args.n_samples), dataset.split("test")


def problem_from_args(args, comm, check=None):
    """(the Problem the common flags describe, the operator to analyse: --operator and
    --layer, the test samples or None); every input checked first (`check_inputs`, about a second, with the script's
    own check(n_samples) if given), TensorFlow started only once they are all good. Call
    on every rank, inside all_ranks."""
    from .. import results
    from ..curvature.problem import Problem
    from ..models import load_model, resolve

    inputs = check_inputs(args, comm, check)
    with all_ranks(comm, exit=False):
        model = load_model(args.model, args.dtype, args.seed)
        if inputs.theta is not None:
            results.check_length(inputs.theta, model.n_params, args.weights)
        loss = resolve(args.loss, model.source, True if args.from_logits else None)
        problem = Problem(model, loss, inputs.samples, comm, args.micro_batch, args.hvp_mode, inputs.theta)
        op = problem.operator_for(args.operator, args.layer)
        nev = getattr(args, "nev", None)
        if nev is not None and not 1 <= nev < op.n:
            raise HessmpiError(f"--nev must be between 1 and {op.n - 1}, got {nev}")
        if comm.Get_rank() == 0:  # before any work: room for θ and nev eigenvectors (or an optimizer's two vectors)
            need = results.estimated_size(model.n_params, nev or 2)
            outputs = [args.out] if getattr(args, "writes_results", False) else []
            for path in outputs + [getattr(args, "checkpoint", None)]:
                if path:
                    results.check_space(path, need)
    return problem, op, inputs.test


def describe_run(args, problem, comm) -> str:
    from .. import __version__

    return (f"hessmpi {__version__}: {problem.model.describe()}; loss {problem.loss!r}; {problem.samples.name}, "
            f"{problem.n_samples:,} samples over {comm.Get_size()} rank(s); "
            f"{runtime.threads()} TensorFlow thread(s) per rank; "
            f"weights: {args.weights or ('initialisation (seed %d)' % args.seed if problem.model.kind else 'the model')}")


def weights_of(args) -> str:
    """Where θ came from, for the results file: --weights, a built-in model's initialisation, or
    a Keras model's own weights."""
    from ..models import builtin

    return args.weights or ("init" if args.model in builtin.MODELS else "model")


def run_attrs(args, started: float) -> dict:
    """The root attributes a script adds to its results file: seed, weights, wall time."""
    return {"seed": args.seed, "weights": weights_of(args), "wall_time": time.perf_counter() - started}


def progress_printer(every: float = 10.0):
    """An operator callback that prints the product count on rank 0 every `every` seconds."""
    state = {"t0": time.perf_counter(), "last": time.perf_counter()}

    def on_matvec(op):
        now = time.perf_counter()
        if now - state["last"] >= every:
            state["last"] = now
            runtime.say(f"  ... {op.n_matvecs} Hessian-vector products, {now - state['t0']:.0f} s")

    return on_matvec


def finish_run(args, op, result, started: float) -> list[str]:
    """Say what the run cost (products of op, seconds since `started`, the share spent in
    communication), add the run's attributes to the result and write it (write_results)."""
    share = op.comm_seconds / max(op.compute_seconds + op.comm_seconds, 1e-12)
    runtime.say(f"{result.attrs['n_matvecs']} {getattr(op, 'kind', 'operator')} products in "
                f"{time.perf_counter() - started:.1f} s ({share:.1%} in communication)")
    result.attrs.update(run_attrs(args, started))
    return write_results(args, result)


def write_results(args, result, plot=True) -> list[str]:
    """result.save(--out) on rank 0, then, unless --no-plot, its PNG next to it (result.plot);
    say what was written and return those paths."""
    written = [result.save(args.out)]
    if plot and not args.no_plot:
        png = os.path.splitext(args.out)[0] + ".png"
        result.plot(png)
        written.append(png)
    runtime.say("wrote " + ", ".join(written))
    return written
