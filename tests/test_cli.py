"""Command-line handling: splitting script flags from PETSc options, and PETSc options no solver reads."""

import pytest

from hessmpi.cli import split_argv


def test_petsc_options_are_split_from_script_flags():
    ours, petsc = split_argv(["--nev", "5", "-hess_eps_type", "lanczos", "-hess_eps_monitor",
                              "--which", "smallest", "-hess_eps_target", "-1.5", "--seed", "-3"])
    assert ours == ["--nev", "5", "--which", "smallest", "--seed", "-3"]
    assert petsc == ["-hess_eps_type", "lanczos", "-hess_eps_monitor", "-hess_eps_target", "-1.5"]


def test_help_stays_with_the_script():
    assert split_argv(["-h"]) == (["-h"], [])
    assert split_argv(["-help"]) == ([], ["-help"])


def test_a_petsc_option_that_no_solver_reads_is_named():
    """check_petsc_options makes the script's solver objects read the options database,
    then names what is left: the typo, not the valid options next to it."""
    from petsc4py import PETSc

    from hessmpi.cli import petsc_options
    from hessmpi.errors import HessmpiError

    options = PETSc.Options()
    given = {"-hessmpitest_eps_tpye": "lanczos", "-hessmpitest_eps_type": "lanczos",
             "-hessmpitest_st_ksp_type": "cg", "-hessmpitest_bv_type": "svec",
             "-hessmpitest_eps_view": "", "-hessmpitest_ksp_converged_reason": ""}
    for name, value in given.items():
        options.setValue(name, value)
    try:
        with pytest.raises(HessmpiError) as info:
            petsc_options.check_petsc_options(eps="hessmpitest_")
        message = str(info.value)
        assert "unknown PETSc option" in message and "-hessmpitest_eps_tpye lanczos" in message
        assert "(its options prefixes: -hessmpitest_ (EPS))" in message
        for valid in ("-hessmpitest_eps_type", "-hessmpitest_st_ksp", "-hessmpitest_bv_type",
                      "-hessmpitest_eps_view", "-hessmpitest_ksp_converged_reason"):
            assert valid not in message
        assert "-hessmpitest_eps_tpye lanczos" in (petsc_options.unused_petsc_options() or [])
    finally:
        for name in given:
            options.delValue(name)
        petsc_options._state["flagged"] = False
