"""The HDF5 writer is atomic and complete; the reader enforces the contract; weights load."""

import os

import h5py
import numpy as np
import pytest

from hessmpi import results
from hessmpi.errors import ResultsError

ATTRS = {a: "x" for a in results.ROOT_ATTRS}


def spectrum_sets(k=3, n=7):
    return {"spectrum/eigenvalues": np.arange(k, dtype=float), "spectrum/eigenvectors": np.ones((k, n)),
            "spectrum/residuals": np.zeros(k), "model/params": np.arange(n, dtype=float)}


def test_write_then_read_round_trip(tmp_path):
    path = tmp_path / "r.h5"
    results.write(str(path), spectrum_sets(), {**ATTRS, "n_matvecs": 12, "converged": True, "weights": None})
    datasets, attrs = results.read(str(path), "spectrum")
    np.testing.assert_array_equal(datasets["spectrum/eigenvectors"], np.ones((3, 7)))
    assert attrs["n_matvecs"] == 12 and attrs["converged"] == 1 and attrs["weights"] == "none"
    assert os.listdir(tmp_path) == ["r.h5"]


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "r.h5"
    results.write(str(path), spectrum_sets(), ATTRS)
    before = path.read_bytes()
    bad = {**spectrum_sets(), "spectrum/bad": object()}
    with pytest.raises(Exception):
        results.write(str(path), bad, ATTRS)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["r.h5"]


def test_reader_names_every_missing_dataset(tmp_path):
    path = tmp_path / "r.h5"
    sets = spectrum_sets()
    del sets["spectrum/residuals"]
    results.write(str(path), sets, ATTRS)
    with pytest.raises(ResultsError, match="/spectrum/residuals"):
        results.read(str(path), "spectrum")
    with h5py.File(path, "a") as f:
        del f.attrs["command"]
    with pytest.raises(ResultsError, match="attribute command"):
        results.read(str(path), "spectrum")


def test_reader_rejects_non_hdf5(tmp_path):
    path = tmp_path / "r.h5"
    path.write_text("not hdf5")
    with pytest.raises(ResultsError, match="not a readable HDF5"):
        results.read(str(path))


def test_check_output(tmp_path):
    path = tmp_path / "sub" / "r.h5"
    results.check_output(str(path), overwrite=False)  # creates the folder
    assert path.parent.is_dir()
    path.write_text("old")
    with pytest.raises(ResultsError, match="--overwrite"):
        results.check_output(str(path), overwrite=False)
    results.check_output(str(path), overwrite=True)
    with pytest.raises(ResultsError, match="directory"):
        results.check_output(str(tmp_path), overwrite=True)


def test_load_weights(tmp_path):
    theta = np.linspace(-1, 1, 7)
    np.savez(tmp_path / "w.npz", params=theta)
    np.testing.assert_array_equal(results.load_weights(str(tmp_path / "w.npz"), 7), theta)
    results.write(str(tmp_path / "r.h5"), spectrum_sets(), ATTRS)
    np.testing.assert_array_equal(results.load_weights(str(tmp_path / "r.h5"), 7), np.arange(7.0))
    with pytest.raises(ResultsError, match="holds 7 values but the model has 8"):
        results.load_weights(str(tmp_path / "w.npz"), 8)
    np.savez(tmp_path / "k.npz", theta=theta)
    with pytest.raises(ResultsError, match="no key 'params'"):
        results.load_weights(str(tmp_path / "k.npz"), 7)
    np.savez(tmp_path / "nan.npz", params=np.full(7, np.nan))
    with pytest.raises(ResultsError, match="NaN"):
        results.load_weights(str(tmp_path / "nan.npz"), 7)
    with pytest.raises(ResultsError, match="no such file"):
        results.load_weights(str(tmp_path / "missing.npz"), 7)
