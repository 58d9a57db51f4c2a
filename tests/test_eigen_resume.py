"""A solve resumed from any pass's Progress equals the
uninterrupted solve, and max_passes=1 skips the check pass."""

import numpy as np
import pytest

from hessmpi import runtime

runtime.init_petsc()

from hessmpi.curvature import petsc  # noqa: E402
from hessmpi.solvers import eigen  # noqa: E402

from cases import degenerate  # noqa: E402,F401 (a shared fixture: 5 copies of 5, 3 of 3, then distinct values)
from mpi_util import collective_assert, comm  # noqa: E402

COMM = comm()


def saved(progress):
    """What a checkpoint keeps of a Progress: full arrays, no PETSc objects."""
    return dict(values=progress.values.copy(), residuals=progress.residuals.copy(),
                vectors=[petsc.vec_to_full(v, COMM) for v in progress.vectors], passes=progress.passes,
                next_want=progress.next_want, iterations=progress.iterations, n_matvecs=progress.n_matvecs,
                norm_estimate=progress.norm_estimate, pass_log=list(progress.pass_log), solver=progress.solver)


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_a_resumed_solve_equals_the_uninterrupted_one(degenerate, which):
    op, mat, H = degenerate.op, degenerate.mat, degenerate.H
    nev = 7
    count = lambda: op.n_matvecs  # noqa: E731
    snapshots = []
    whole = eigen.solve(mat, nev, which, matvec_counter=count, on_pass=lambda p: snapshots.append(saved(p)))
    W = np.column_stack([petsc.vec_to_full(v, COMM) for v in whole.vectors])
    exact = np.sort(np.linalg.eigvalsh(H))
    exact = exact[::-1][:nev] if which == "largest" else exact[:nev]
    ok = whole.passes >= 2 and len(snapshots) == whole.passes and snapshots[-1]["next_want"] == 0
    msg = f"{which}: {whole.passes} passes, {len(snapshots)} snapshots"
    ok = ok and np.abs(whole.values - exact).max() <= 1e-8 * abs(exact).max()
    for snap in snapshots:
        state = dict(snap)
        vectors = [petsc.vec_from_full(mat, x) for x in state.pop("vectors")]
        before = op.n_matvecs
        r = eigen.solve(mat, nev, which, matvec_counter=count, resume=eigen.Progress(vectors=vectors, **state))
        V = np.column_stack([petsc.vec_to_full(v, COMM) for v in r.values.size and r.vectors])
        same = (np.array_equal(r.values, whole.values) and np.abs(V - W).max() <= 1e-12
                and r.n_matvecs == whole.n_matvecs and r.passes == whole.passes
                and r.n_matvecs - snap["n_matvecs"] == op.n_matvecs - before)
        ok = ok and same
        if not same:
            msg += f"; resumed after pass {snap['passes']}: {r.values} vs {whole.values}"
    collective_assert(ok, msg)


def test_one_pass_skips_the_check(degenerate):
    """One pass may miss copies of a repeated eigenvalue, but returns true eigenvalues, without raising."""
    mat, H = degenerate.mat, degenerate.H
    r = eigen.solve(mat, 3, "largest", max_passes=1)
    spectrum = np.linalg.eigvalsh(H)
    distance = np.abs(r.values[:, None] - spectrum[None, :]).min(axis=1).max() if len(r.values) else np.inf
    collective_assert(r.passes == 1 and len(r.values) == 3 and r.values[0] == max(r.values)
                      and distance <= 1e-8 * spectrum.max(), f"{r.passes} passes, {r.values}")
