"""A solve resumed from any pass's Progress equals the
uninterrupted solve, so does one stopped inside a pass (a stop request) and resumed,
and max_passes=1 skips the check pass."""

import numpy as np
import pytest

from hessmpi import runtime, stop
from hessmpi.errors import Interrupted

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
                norm_estimate=progress.norm_estimate, pass_log=list(progress.pass_log), solver=progress.solver,
                replay=[(digest, y.copy()) for digest, y in progress.replay])


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


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_a_solve_stopped_anywhere_resumes_to_the_same_result_for_one_product_more(degenerate, which):
    """A stop request at product m (inside the first pass, the check passes, the true residuals;
    for "smallest" also inside the norm estimate) raises Interrupted on every rank after
    on_pass got the progress; the solve resumed from it retraces the interrupted pass's
    products instead of computing them and returns the uninterrupted result bit for bit,
    having computed one product more in all (the one the stop interrupted), or the
    products of the norm estimate more when it was stopped there (nothing is saved then)."""
    op, mat = degenerate.op, degenerate.mat
    nev = 7
    count = lambda: op.n_matvecs  # noqa: E731
    whole = eigen.solve(mat, nev, which, matvec_counter=count)
    W = np.column_stack([petsc.vec_to_full(v, COMM) for v in whole.vectors])
    ok, msg = True, f"{which}: {whole.n_matvecs} products uninterrupted"
    for m in sorted({1, 5, 17, whole.n_matvecs // 2, whole.n_matvecs - nev - 1, whole.n_matvecs - 2}):
        snapshots, start = [], op.n_matvecs
        op.on_matvec = lambda o: stop.request() if o.n_matvecs - start == m else None
        try:
            eigen.solve(mat, nev, which, matvec_counter=count, on_pass=lambda p: snapshots.append(saved(p)))
            stopped = False
        except Interrupted:
            stopped = True
        finally:
            op.on_matvec = None
            stop.clear()
        first = op.n_matvecs - start
        resume = None
        if snapshots:
            state = dict(snapshots[-1])
            resume = eigen.Progress(vectors=[petsc.vec_from_full(mat, x) for x in state.pop("vectors")], **state)
        before = op.n_matvecs
        r = eigen.solve(mat, nev, which, matvec_counter=count, resume=resume)
        total = first + op.n_matvecs - before
        V = np.column_stack([petsc.vec_to_full(v, COMM) for v in r.vectors])
        extra = 1 if resume is not None else first  # stopped in the norm estimate: nothing saved
        same = (stopped and first == m + 1 and np.array_equal(r.values, whole.values) and np.array_equal(V, W)
                and total == whole.n_matvecs + extra and r.passes == whole.passes
                and (resume is None or r.n_matvecs == total))
        ok = ok and same
        msg += (f"; stop at {m}: stopped {stopped} after {first}, {total} products in all, recorded {r.n_matvecs}, "
                f"values equal {np.array_equal(r.values, whole.values)}")
    collective_assert(ok, msg)
