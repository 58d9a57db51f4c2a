"""Plumbing for running the suite single-rank and as `mpirun -n N python -m pytest`.

Under mpirun every rank runs the whole session. Rank 0 reports as usual; the other
ranks print nothing but their failures, to stderr, prefixed with `[rank r]`. Each
rank has its own --basetemp. At the end the ranks agree on one exit status, so a
failure on any rank fails the run on all. Tests marked `serial` (they launch mpirun
themselves) are skipped under mpirun. Run the MPI passes with `-p no:cacheprovider`
(as `make test` does) so that the ranks do not all write .pytest_cache.
"""

from __future__ import annotations

import shutil
import sys
import tempfile

import pytest

try:
    from mpi4py import MPI
except ImportError:  # the single-rank suite does not need MPI
    MPI = None

COMM = MPI.COMM_WORLD if MPI is not None else None
RANK = COMM.Get_rank() if COMM is not None else 0
SIZE = COMM.Get_size() if COMM is not None else 1

_failed_ranks: list[int] = []
_own_basetemp: str | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """One --basetemp per rank: rank 0's (given, or a fresh one removed at the end)
    with `-rank<r>` appended on the other ranks."""
    global _own_basetemp
    if SIZE == 1:
        return
    given = config.option.basetemp
    root = given or COMM.bcast(tempfile.mkdtemp(prefix="hessmpi-pytest-") if RANK == 0 else None)
    config.option.basetemp = root if RANK == 0 else f"{root}-rank{RANK}"
    if not given:
        _own_basetemp = config.option.basetemp


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if SIZE > 1 and RANK > 0:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.unregister(reporter)


def pytest_collection_modifyitems(config, items):
    if SIZE > 1:
        skip = pytest.mark.skip(reason="serial: launches mpirun itself; runs in the single-rank pass")
        for item in items:
            if "serial" in item.keywords:
                item.add_marker(skip)


def _print_failure(report):
    if RANK == 0 or not report.failed:
        return
    what = "FAILED" if getattr(report, "when", "call") == "call" else f"ERROR at {report.when} of"
    lines = [f"{what} {report.nodeid}", *report.longreprtext.splitlines()]
    for title, content in report.sections:
        lines += [f"----- {title} -----", *content.splitlines()]
    # The leading newline keeps the block off the end of rank 0's line of dots.
    sys.stderr.write("\n" + "".join(f"[rank {RANK}] {line}\n" for line in lines))
    sys.stderr.flush()


def pytest_runtest_logreport(report):
    _print_failure(report)


def pytest_collectreport(report):
    _print_failure(report)


def pytest_sessionfinish(session, exitstatus):
    """All ranks leave with the worst exit status of any rank."""
    if SIZE == 1:
        return
    statuses = COMM.allgather(int(exitstatus))
    _failed_ranks[:] = [r for r, s in enumerate(statuses) if s != 0]
    if _failed_ranks:
        session.exitstatus = max(statuses)


def pytest_terminal_summary(terminalreporter):
    if _failed_ranks:
        ranks = ", ".join(map(str, _failed_ranks))
        terminalreporter.write_line(
            f"mpirun -n {SIZE}: failures on rank(s) {ranks}; ranks > 0 report theirs as [rank r] lines", red=True
        )


def pytest_unconfigure(config):
    if SIZE == 1:
        return
    if _own_basetemp:
        shutil.rmtree(_own_basetemp, ignore_errors=True)
    # Open MPI aborts the job when a rank exits non-zero: wait until rank 0 has
    # printed its summary.
    COMM.Barrier()


@pytest.fixture
def shared_tmp_path(tmp_path):
    """A directory that every rank sees: rank 0's tmp_path. Every rank must request it."""
    if SIZE == 1:
        return tmp_path
    return type(tmp_path)(COMM.bcast(str(tmp_path) if RANK == 0 else None))
