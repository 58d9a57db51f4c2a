"""The README's quickstart as a new user runs it: examples/make_model.py makes a saved Keras
model and an .npz of data; examples/quickstart.py analyses them with `python` and under
`mpirun -n 2`, and scripts/spectrum.py does the same from the command line; the numbers
agree. The README shows the quickstart's code verbatim (checked here)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from hessmpi import results
from mpi_util import MPI_ENV, run_mpi

pytestmark = pytest.mark.serial
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def code_lines(text):
    """The lines of Python code in text, without comments, blank lines and the docstring."""
    text = re.sub(r'^""".*?"""\n', "", text, count=1, flags=re.S | re.M)
    return [line.split("  #")[0].rstrip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith(("#", "#!"))]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder holding model.keras and data.npz, made as the README says."""
    folder = tmp_path_factory.mktemp("quickstart")
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "make_model.py"), str(folder)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **MPI_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def test_the_readme_shows_the_quickstart_verbatim():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(EXAMPLES, "quickstart.py")) as f:
        example = code_lines(f.read())
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert any(code_lines(b) == example for b in blocks), "README's Python quickstart differs from the example"
    head = readme[:readme.index("```python") + 1]
    assert head.count("\n") < 40, "the quickstart is not on the README's first screen"


def test_quickstart_gives_the_same_numbers_on_one_and_two_ranks_and_from_the_cli(folder):
    quickstart = os.path.join(EXAMPLES, "quickstart.py")
    one = subprocess.run([sys.executable, quickstart], cwd=folder, capture_output=True, text=True, timeout=600,
                         env={**os.environ, **MPI_ENV})
    assert one.returncode == 0, one.stderr[-3000:]
    single, attrs = results.read(str(folder / "top.h5"), "spectrum")
    assert os.path.getsize(folder / "top.png") > 1000 and attrs["n_ranks"] == 1 and attrs["model"] == "sequential"
    os.rename(folder / "top.h5", folder / "one.h5")
    cmd = ["mpirun", "-n", "2", sys.executable, quickstart]
    two = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=600,
                         env={**os.environ, **MPI_ENV}, stdin=subprocess.DEVNULL)
    assert two.returncode == 0, two.stderr[-3000:]
    pair, attrs2 = results.read(str(folder / "top.h5"), "spectrum")
    lam = single["spectrum/eigenvalues"]
    assert attrs2["n_ranks"] == 2 and attrs["dtype"] == "float32" and len(lam) == 10 and np.all(np.diff(lam) <= 0)
    # float32 products (the model's own dtype), solved to 1e-5: the rank counts agree to that
    np.testing.assert_allclose(pair["spectrum/eigenvalues"], lam, rtol=1e-5)
    assert two.stdout.count("rel. residual") == 1  # the table, printed by rank 0 only

    # the same analysis from the command line, in float32 as the model is
    out = str(folder / "cli.h5")
    proc = run_mpi(2, [os.path.join(ROOT, "scripts", "spectrum.py"), "--model", str(folder / "model.keras"),
                       "--data", str(folder / "data.npz"), "--dtype", "float32", "--out", out, "--no-plot"],
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli, cli_attrs = results.read(out, "spectrum")
    np.testing.assert_allclose(cli["spectrum/eigenvalues"], lam, rtol=1e-5)
    assert cli_attrs["model"] == str(folder / "model.keras") and cli_attrs["dataset"] == str(folder / "data.npz")
    names = [n.decode() for n in cli["model/layout/names"]]
    assert names == ["dense/kernel", "dense/bias", "dense_1/kernel", "dense_1/bias"], names
