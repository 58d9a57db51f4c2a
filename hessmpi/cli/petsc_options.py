"""PETSc options that no solver reads: named before the solve, and listed again at exit.

A misspelt option (-hess_eps_tpye) would otherwise be ignored silently. A script calls
`check_petsc_options` with the options prefixes of its solvers once PETSc has started:
every option of the command line that none of them reads is named in one HessmpiError,
before anything slow runs. Options read only when viewing or at exit (-log_view,
-*_converged_reason) are not named then; after `report_unused_at_exit`, PETSc's own
-options_left warning lists at exit whatever stayed unused, on rank 0, once the run
finished (`run_finished`) or an option was named as unknown.
"""

from __future__ import annotations

import atexit
import os

from ..errors import HessmpiError

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
    unused. Call on every rank after init_petsc, inside cli.all_ranks.
    """
    from .. import runtime

    PETSc, SLEPc = runtime.petsc(), runtime.slepc()
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


def report_unused_at_exit() -> None:
    """Have PETSc list at exit the options that stay unused, once the run finished or an
    option was named as unknown. Call once, right after petsc4py.init: registered after
    petsc4py's PetscFinalize, the report runs before it (atexit runs the last first)."""
    atexit.register(_report_unused_options)


def run_finished() -> None:
    """Record that the run finished, so that options left unused are listed at exit."""
    _state["finished"] = True


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
