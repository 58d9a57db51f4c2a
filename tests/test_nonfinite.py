"""A NaN or Inf in a product stops every rank at the same product (any rank count).

The end-to-end case (a real script, mpirun -n 2) is in test_failures.py; this one
runs in the MPI passes too, where the bad value comes from one rank only.
"""

import numpy as np
import pytest

from hessmpi.errors import NumericalError
from hessmpi.curvature import DistributedOperator
from mpi_util import collective_assert, comm


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_product_on_the_last_rank_raises_on_every_rank(bad):
    world = comm()
    n, last = 13, world.Get_size() - 1
    calls = []

    def local_product(v):
        calls.append(1)
        out = np.array(v, dtype=np.float64)
        if len(calls) == 2 and world.Get_rank() == last:
            out[0] = bad  # entry 0 is owned by rank 0: only the sum carries it there
        return out

    op = DistributedOperator(local_product, n, 1.0 / world.Get_size(), world)
    x = np.ones(op.n_local)
    np.testing.assert_allclose(op.apply(x), x)
    try:
        op.apply(x)
        error = None
    except NumericalError as e:
        error = e
    collective_assert(error is not None and error.collective and "product 2 " in str(error)
                      and "--dtype float64" in str(error), repr(error))
    collective_assert(op.n_matvecs == 1, f"n_matvecs {op.n_matvecs}")
    np.testing.assert_allclose(op.apply(x), x)  # the operator is usable again afterwards
