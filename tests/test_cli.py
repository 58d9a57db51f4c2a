"""Command-line splitting between the script's flags and PETSc options."""

from hessmpi.cli import split_argv


def test_petsc_options_are_split_from_script_flags():
    ours, petsc = split_argv(["--nev", "5", "-hess_eps_type", "lanczos", "-hess_eps_monitor",
                              "--which", "smallest", "-hess_eps_target", "-1.5", "--seed", "-3"])
    assert ours == ["--nev", "5", "--which", "smallest", "--seed", "-3"]
    assert petsc == ["-hess_eps_type", "lanczos", "-hess_eps_monitor", "-hess_eps_target", "-1.5"]


def test_help_stays_with_the_script():
    assert split_argv(["-h"]) == (["-h"], [])
    assert split_argv(["-help"]) == ([], ["-help"])
