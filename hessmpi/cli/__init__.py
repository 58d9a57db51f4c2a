"""What the scripts share: flags, PETSc options, inputs checked before TensorFlow, the error policy, progress."""

from ..errors import HessmpiError
from ..runtime import say, world
from .args import (DATASET_CHOICES, ArgumentParser, Inputs, check_inputs, common_parser, describe_run, finish_run,
                   init_petsc, problem_from_args, progress_printer, run_attrs, split_argv, weights_of,
                   write_results)
from .petsc_options import check_petsc_options
from .policy import all_ranks, main_guard

__all__ = ["ArgumentParser", "DATASET_CHOICES", "HessmpiError", "Inputs", "all_ranks", "check_inputs",
           "check_petsc_options", "common_parser", "describe_run", "finish_run", "init_petsc", "main_guard", "problem_from_args",
           "progress_printer", "run_attrs", "say", "split_argv", "weights_of", "world", "write_results"]
