"""The notebooks in examples/ as a user meets them.

Every examples/*.ipynb runs top to bottom in quick mode (HESSMPI_QUICK=1: small sizes),
in a fresh folder, with `mpirun` allowed as root and oversubscribed (cells may run it); a
cell that raises fails the test with its source and traceback. The run is on a copy in
memory: nothing is written into examples/.

The committed files carry the outputs of one full-size run: every code cell executed once,
in order, from a fresh kernel; no error output; at least one figure; and the first code
cell's `quick mode: False`.
"""

import glob
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

from mpi_util import MPI_ENV

pytestmark = pytest.mark.serial
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "examples", "*.ipynb")))
CELL_TIMEOUT = 900  # seconds per cell in quick mode, so that a hung cell cannot hang CI
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # IPython colours its tracebacks


def code_cells(nb):
    """The code cells that hold code (Jupyter and nbclient skip empty ones)."""
    return [cell for cell in nb.cells if cell.cell_type == "code" and cell.source.strip()]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_the_notebook_runs_top_to_bottom_in_quick_mode(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    for cell in code_cells(nb):  # the committed outputs are the full run's: start from none
        cell.outputs, cell.execution_count = [], None
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    env = {**os.environ, **MPI_ENV, "HESSMPI_QUICK": "1"}
    failure = None
    try:
        client.execute(env=env)
    except (CellExecutionError, CellTimeoutError) as e:
        failure = ANSI.sub("", str(e))  # the cell's source and its traceback
    if failure is not None:  # failed outside the except block: no chained traceback in the report
        nbformat.write(nb, str(tmp_path / os.path.basename(path)))  # the outputs so far, to look at
        pytest.fail(f"{os.path.basename(path)} (quick mode, run in {tmp_path}):\n{failure}", pytrace=False)
    first = "".join(out.get("text", "") for out in code_cells(nb)[0].outputs)
    assert "quick mode: True" in first, f"the first code cell did not see HESSMPI_QUICK=1: {first!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_the_committed_notebook_holds_a_full_size_run(path):
    nb = nbformat.read(path, as_version=4)
    cells = code_cells(nb)
    name = os.path.basename(path)
    assert cells, f"{name} has no code"
    counts = [cell.get("execution_count") for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{name}: execution counts {counts}, not one run from a fresh kernel (1, 2, …); "
        f"run it again top to bottom (full size: HESSMPI_QUICK unset) and save")
    errors = [(i, out.get("ename"), out.get("evalue")) for i, cell in enumerate(cells, 1)
              for out in cell.outputs if out.output_type == "error"]
    assert not errors, f"{name} was saved with errors in code cells (number, error, message): {errors}"
    pictures = sum("image/png" in out.get("data", {}) for cell in cells for out in cell.outputs)
    assert pictures, f"{name} was saved without a figure"
    first = "".join(out.get("text", "") for out in cells[0].outputs)
    assert re.search(r"^quick mode: False$", first, flags=re.M), (
        f"{name}: its first code cell should print 'quick mode: False' (a full-size run); it printed {first!r}")


def test_a_returned_figure_shows_as_a_picture_in_a_fresh_kernel():
    """What every `.plot()` returns (plots.common.finish) appears as a PNG, not as the text
    '<Figure …>', in a kernel where nothing has drawn with pyplot yet."""
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell("from hessmpi.plots import common\n"
                                           "fig, ax = common.subplots(1)\n"
                                           "ax.plot([0, 1])\n"
                                           "common.finish(fig, None)")])
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3").execute()
    kinds = [sorted(out.get("data", {})) for out in nb.cells[0].outputs]
    assert any("image/png" in k for k in kinds), f"the returned figure was shown as {kinds}, without a PNG"
