"""One HDF5 file per run: written atomically, read back with the contract checked.

`write` creates the file under a temporary name in the target folder and renames
it into place only once it is complete, so a crash never leaves a half-written file
where a good one was. Only one rank writes (the caller decides which).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from .errors import ResultsError

ROOT_ATTRS = ("model", "dataset", "n_params", "n_samples", "n_ranks", "dtype",
              "hessmpi_version", "command")


def version() -> str:
    from . import __version__

    return __version__


def command() -> str:
    """This process's command line, as the `command` attribute records it."""
    import shlex
    import sys

    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv)

CONTRACT = {
    "spectrum": ("spectrum/eigenvalues", "spectrum/eigenvectors", "spectrum/residuals"),
    "rank_curve": ("rank_curve/batch_sizes", "rank_curve/ranks"),
    "density": ("density/grid", "density/values", "trace/estimate", "trace/stderr"),
    "newton": ("newton/loss", "newton/grad_norm", "newton/test_accuracy", "model/params"),
    "monitor": ("monitor/epoch", "monitor/train_time", "monitor/top_eigenvalues", "monitor/trace",
                "monitor/negative_mass"),
}


def check_output(path: str, overwrite: bool) -> None:
    """Raise ResultsError unless path can be written: a file can be created and removed in
    its folder, and no file is there already unless overwrite. Creates the folder if needed."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path) and not overwrite:
        raise ResultsError(f"{path} exists; pass --overwrite to replace it, or choose another --out")
    if os.path.isdir(path):
        raise ResultsError(f"{path} is a directory; --out must name a file")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ResultsError(f"cannot create the folder of {path}: {e.strerror}") from None
    try:  # a real write: permission bits say nothing for root, a read-only mount or /proc
        fd, probe = tempfile.mkstemp(prefix=".hessmpi-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ResultsError(f"cannot write to {folder} ({e.strerror}); choose another folder for {path}") from None


def check_space(path: str, n_bytes: int) -> None:
    """Raise ResultsError if the file system of path's folder has less than n_bytes free."""
    import shutil

    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    if free < n_bytes:
        raise ResultsError(f"{folder} has {free / 1e6:.2f} MB free and {path} needs at least {n_bytes / 1e6:.2f} MB: "
                           f"free some space or choose another folder")


def estimated_size(n_params: int, vectors: int) -> int:
    """A lower bound on the bytes of a results file (or checkpoint) that holds θ and `vectors`
    more θ-sized float64 vectors (histories, attributes and the PNG come on top)."""
    return 8 * n_params * (vectors + 1)


def file_mode() -> int:
    """The mode a new file gets under this process's umask: what `open` would create, where
    mkstemp's 0600 would hide a result the user's umask shares (or 0644 one it hides)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _to_attr(value):
    if value is None:
        return "none"
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    return value


def write(path: str, datasets: dict, attrs: dict) -> None:
    """Write datasets {'group/name': array} and root attrs to path, atomically: the previous
    file stays as it was unless the new one is complete. If path cannot be written (a full
    disk, a folder gone), the same file is written to the temporary folder instead (TMPDIR)
    and ResultsError names both, with the reason."""
    missing = [a for a in ROOT_ATTRS if a not in attrs]
    if missing:
        raise ValueError(f"results attributes missing: {missing}")
    try:
        _write_atomically(path, datasets, attrs)
    except OSError as e:
        message = f"cannot write {path} ({reason(e)}); any previous file there is unchanged"
        spare = os.path.join(tempfile.gettempdir(), f"hessmpi-{os.getpid()}-{os.path.basename(path)}")
        try:
            _write_atomically(spare, datasets, attrs)
            message += f"; the results were written to {spare} instead"
        except OSError as e2:
            message += f"; writing them to {spare} failed too ({reason(e2)}): they are lost"
        raise ResultsError(message) from None


def reason(error: OSError) -> str:
    """An OSError's reason in a few words (h5py's messages run to several lines)."""
    return os.strerror(error.errno) if error.errno else str(error).splitlines()[0]


def _write_atomically(path: str, datasets: dict, attrs: dict) -> None:
    """The file is made in memory and then written with plain file I/O: a full disk is then
    one OSError, where HDF5 writing to disk fails inside its buffers and leaves h5py in a
    state that crashes the process."""
    import io

    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = _to_attr(value)
        for name, array in datasets.items():
            f.create_dataset(name, data=np.asarray(array))
    replace_file(path, lambda f: f.write(buffer.getbuffer()))


def replace_file(path: str, fill, suffix: str = "") -> None:
    """Create or replace path atomically: fill(f) writes a temporary binary file in the same
    folder, which is synced, given the mode the user's umask gives (file_mode) and renamed
    onto path. On any failure the temporary file is removed and a previous file at path is
    unchanged; the error propagates."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(path: str, datasets: dict, attrs: dict, comm=None) -> None:
    """`write` on rank 0 of comm (default MPI_COMM_WORLD) only; the other ranks return at once."""
    from . import runtime

    if (comm.Get_rank() if comm is not None else runtime.rank()) == 0:
        write(path, datasets, attrs)


def read(path: str, kind: str | None = None) -> tuple[dict, dict]:
    """(datasets, attrs) of a results file; with kind, raise ResultsError naming every
    dataset of the contract that the file lacks."""
    import h5py

    if not os.path.isfile(path):
        raise ResultsError(f"no results file at {path}")
    try:
        with h5py.File(path, "r") as f:
            datasets = {}
            f.visititems(lambda name, obj: datasets.__setitem__(name, obj[()])
                         if isinstance(obj, h5py.Dataset) else None)
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except OSError as e:
        raise ResultsError(f"{path} is not a readable HDF5 file ({e})") from None
    if kind is not None:
        lacking = [f"/{d}" for d in CONTRACT[kind] if d not in datasets]
        lacking += [f"attribute {a}" for a in ROOT_ATTRS if a not in attrs]
        if lacking:
            raise ResultsError(f"{path} is not a complete {kind} results file: it lacks {', '.join(lacking)}")
    return datasets, attrs


def load_weights(path: str, n_params: int | None = None) -> np.ndarray:
    """θ from an .npz with key 'params' or from a results file's /model/params, checked to be
    finite (and to have n_params entries, if given)."""
    if not os.path.isfile(path):
        raise ResultsError(f"--weights {path}: no such file")
    if path.endswith(".npz"):
        try:
            with np.load(path) as z:
                if "params" not in z.files:
                    raise ResultsError(f"--weights {path}: no key 'params' (it has {', '.join(z.files) or 'no keys'}); "
                                       f"save θ with np.savez(path, params=theta)")
                theta = np.asarray(z["params"], dtype=np.float64)
        except (OSError, ValueError) as e:
            raise ResultsError(f"--weights {path}: not a readable .npz file ({e})") from None
    else:
        datasets, _ = read(path)
        if "model/params" not in datasets:
            raise ResultsError(f"--weights {path}: the file has no /model/params dataset")
        theta = np.asarray(datasets["model/params"], dtype=np.float64)
    theta = theta.ravel()
    if not np.all(np.isfinite(theta)):
        raise ResultsError(f"--weights {path} contains NaN or infinite values")
    if n_params is not None:
        check_length(theta, n_params, path)
    return theta


def check_length(theta: np.ndarray, n_params: int, path: str) -> None:
    """ResultsError unless the weights of `path` have n_params entries."""
    if theta.size != n_params:
        raise ResultsError(f"--weights {path} holds {theta.size:,} values but the model has "
                           f"{n_params:,} parameters (wrong --model?)")
