"""Training samples as an analysis sees them: arrays in memory or a tf.data stream, and
this rank's contiguous block of them cut into micro-batches.

`Data` holds inputs x (one array, or a tuple/list/dict of arrays for a model with
several inputs) and targets y, one row per sample, in canonical order; it is what the
built-in datasets, an .npz file and a user's numpy arrays become. `Stream` is a
tf.data.Dataset of single samples (x, y), read by each rank from its first row to its
last in micro-batches, never materialised whole. `as_samples` accepts either, or an
(x, y) pair, and checks it (DataError names what is wrong). Nothing here starts
TensorFlow but `Stream` and `LocalShard`.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import runtime
from ..errors import DataError


def _leaves(x) -> list:
    """The arrays of an input structure: x itself, or the values of a tuple, list or dict."""
    if isinstance(x, dict):
        return [x[k] for k in sorted(x)]
    if isinstance(x, (tuple, list)):
        return list(x)
    return [x]


def _map(fn, x):
    """fn applied to every array of an input structure, keeping the structure."""
    if isinstance(x, dict):
        return {k: fn(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(fn(v) for v in x)
    return fn(x)


@dataclass(frozen=True, eq=False)
class Data:
    """Samples in memory: inputs x and targets y, one row per sample (canonical order).

    pixels=True marks x as uint8 pixel values 0..255 that the model sees as k/255 in its
    compute dtype (hessmpi's datasets keep their pixels as bytes: a quarter of float32).
    Construction checks that every array has the same number of rows, at least one, and
    that floating values are finite (DataError naming `where`).
    """

    x: Any
    y: Any
    name: str = "arrays"
    pixels: bool = False
    where: str = field(default="the data", repr=False)

    def __post_init__(self):
        xs = [np.asarray(a) for a in _leaves(self.x)]
        if not xs:
            raise DataError(f"{self.where}: x holds no arrays")
        y = np.asarray(self.y)
        n = len(y) if y.ndim else -1
        for a in xs:
            if a.ndim == 0:
                raise DataError(f"{self.where}: x must have one row per sample, got a scalar")
        lengths = sorted({len(a) for a in xs})
        if y.ndim == 0 or len(lengths) > 1 or lengths[0] != n:
            raise DataError(f"{self.where}: x and y must have one row per sample each; got "
                            f"{' and '.join(str(len(a)) for a in xs)} rows of x and "
                            f"{n if n >= 0 else 'a scalar'} of y")
        if n < 1:
            raise DataError(f"{self.where}: no samples")
        for what, arrays in (("x", xs), ("y", [y])):
            for a in arrays:
                if a.dtype.kind not in "biuf":
                    raise DataError(f"{self.where}: {what} must be numeric, got dtype {a.dtype}")
                if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                    raise DataError(f"{self.where}: {what} holds NaN or infinite values")
        if self.pixels and (len(xs) != 1 or xs[0].dtype != np.uint8):
            raise DataError(f"{self.where}: pixels=True needs one uint8 input array")

    @property
    def n(self) -> int:
        return len(self.y)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of every array's dtype, shape and bytes: what tells a checkpoint whose
        samples these were."""
        digest = hashlib.blake2b(digest_size=12)
        for a in [*_leaves(self.x), self.y]:
            a = np.ascontiguousarray(a)
            digest.update(f"{a.dtype.str}{a.shape}".encode())
            digest.update(a.data)
        return digest.hexdigest()

    def rows(self, start: int, stop: int) -> "Data":
        """Rows start..stop−1 (views; possibly none)."""
        return self._view(_map(lambda a: a[start:stop], self.x), self.y[start:stop])

    def take(self, indices: np.ndarray) -> "Data":
        """The rows of `indices` (copies; possibly none)."""
        indices = np.asarray(indices, dtype=np.int64)
        return self._view(_map(lambda a: a[indices], self.x), self.y[indices])

    def _view(self, x, y) -> "Data":
        """A Data of rows of this one, without checking them again."""
        view = object.__new__(Data)
        for name, value in (("x", x), ("y", y), ("name", self.name), ("pixels", self.pixels),
                            ("where", self.where)):
            object.__setattr__(view, name, value)
        return view

    def features(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start..stop−1 of the single input as the model sees it, as float64 (n, …):
        pixels scaled to [0, 1]. For the closed forms of softmax regression."""
        (x,) = _leaves(self.x)
        x = np.asarray(x[start:stop], dtype=np.float64)
        return x / 255 if self.pixels else x


def load_npz(path: str, split: str = "train") -> Data:
    """x_<split> and y_<split> of an .npz file (Keras' mnist.npz convention) as Data.

    DataError names the file and the missing key, or what else is wrong with it."""
    if not os.path.isfile(path):
        raise DataError(f"--data {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            wanted = (f"x_{split}", f"y_{split}")
            missing = [k for k in wanted if k not in keys]
            if missing:
                raise DataError(f"--data {path}: no key {' or '.join(missing)} (it has "
                                f"{', '.join(keys) or 'no keys'}); save with np.savez(path, x_train=x, "
                                f"y_train=y, x_test=..., y_test=...)")
            x, y = z[wanted[0]], z[wanted[1]]
    except (OSError, ValueError) as e:
        raise DataError(f"--data {path}: not a readable .npz file ({e})") from None
    return Data(x, y, name=path, where=f"--data {path} ({split})")


def has_split(path: str, split: str) -> bool:
    """Whether an .npz file holds x_<split> and y_<split>."""
    with np.load(path, allow_pickle=False) as z:
        return f"x_{split}" in z.files and f"y_{split}" in z.files


class Stream:
    """A tf.data.Dataset of single samples (x, y), of which the first n are used.

    A batched dataset (its x one rank higher than `sample_rank`, when that is given) is
    unbatched, and n counts samples, not batches (a finite one is counted in one pass).
    n defaults to the dataset's cardinality; an infinite or unknown one needs n, and one
    of unknown length is counted up to n once. Each rank reads only its block, from the
    start of the dataset, at every pass: the dataset must give the same samples in the
    same order at every pass (no reshuffling shuffle), or the operator is not one matrix.
    """

    def __init__(self, dataset, n: int | None = None, name: str = "tf.data", sample_rank: int | None = None):
        tf = runtime.import_tensorflow()

        if not isinstance(dataset, tf.data.Dataset):
            raise DataError(f"expected a tf.data.Dataset, got {type(dataset).__name__}")
        spec = dataset.element_spec
        if not (isinstance(spec, tuple) and len(spec) == 2):
            raise DataError("a tf.data.Dataset for hessmpi yields (x, y) pairs; map it to pairs "
                            "(an autoencoder: dataset.map(lambda x: (x, x)))")
        cardinality = int(dataset.cardinality())
        if sample_rank is not None and tf.nest.flatten(spec[0])[0].shape.rank == sample_rank + 1:
            dataset = dataset.unbatch()  # its cardinality is unknown: count the samples of a finite one
            if cardinality >= 0:
                cardinality = int(dataset.reduce(np.int64(0), lambda count, *_: count + 1))
        self.dataset, self.name, self.pixels = dataset, name, False
        if n is None:
            if cardinality < 0:
                raise DataError("the tf.data.Dataset's length is unknown or infinite; pass n_samples")
            n = cardinality
        elif cardinality == tf.data.UNKNOWN_CARDINALITY:  # a short one would leave the last ranks short
            cardinality = int(dataset.take(n).reduce(np.int64(0), lambda count, *_: count + 1))
        if n < 1 or (cardinality >= 0 and n > cardinality):
            raise DataError(f"n_samples {n} is out of range: the dataset has "
                            f"{cardinality if cardinality >= 0 else 'an unknown number of'} samples")
        self.n = n

    @property
    def fingerprint(self) -> str:
        """What tells a checkpoint whose samples these were, short of reading them: the
        stream's name, length and element spec."""
        return f"{self.name}:{self.n}:{self.dataset.element_spec!r}"

    def first(self) -> tuple:
        """The first sample (x, y) as numpy values."""
        for x, y in self.dataset.take(1).as_numpy_iterator():
            return x, y
        raise DataError("the tf.data.Dataset is empty")

    def batches(self, start: int, stop: int, micro_batch: int):
        """Rows start..stop−1 in micro-batches of tensors (a fresh pass over the dataset)."""
        if stop > start:
            yield from self.dataset.take(self.n).skip(start).take(stop - start).batch(micro_batch)


def as_samples(data, n_samples: int | None = None, sample_rank: int | None = None, what: str = "--n-samples"):
    """Data or Stream from what the API accepts: Data, Stream, an (x, y) pair of arrays, or
    a tf.data.Dataset of (x, y) samples (or of batches of them, unbatched when sample_rank,
    the number of axes of one sample's first input, says so); only the first n_samples are
    used (all if None). DataError, naming the setting `what`, if n_samples is outside
    1..available."""
    import sys

    if isinstance(data, (Data, Stream)):
        samples = data
    elif "tensorflow" in sys.modules and isinstance(data, sys.modules["tensorflow"].data.Dataset):
        return Stream(data, n_samples, sample_rank=sample_rank)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        samples = Data(*data)
    else:
        raise DataError(f"data must be an (x, y) pair of arrays, hessmpi.Data or a tf.data.Dataset; "
                        f"got {type(data).__name__}")
    if n_samples is None or n_samples == samples.n:
        return samples
    if not 1 <= n_samples <= samples.n:
        raise DataError(f"{what} {n_samples} is out of range: {samples.name} has {samples.n:,} "
                        f"samples (use 1..{samples.n})")
    if isinstance(samples, Stream):
        return Stream(samples.dataset, n_samples, samples.name)
    return samples.rows(0, n_samples)


class LocalShard:
    """This rank's block [lo, hi) of the samples (data.shard_range), in micro-batches of
    tensors: floating arrays in the compute dtype, pixels and integers as they are. Arrays
    are made tensors once (made at every use, they cost a 4-ms softmax product 5–7%:
    bench/hvp_cost.py); a Stream is read again at every pass. `spec` is the (x, y)
    TensorSpec of a micro-batch, its batch dimension open."""

    def __init__(self, samples, lo: int, hi: int, micro_batch: int, dtype):
        tf = runtime.import_tensorflow()

        if micro_batch < 1:
            raise DataError(f"micro-batch size must be at least 1, got {micro_batch}")
        self.samples, self.lo, self.hi, self.micro_batch = samples, lo, hi, micro_batch
        self.n_samples = hi - lo
        self.pixels = samples.pixels
        self.dtype = tf.as_dtype(dtype)

        def open_batch(s):
            kind = self.dtype if s.dtype.is_floating else s.dtype
            return tf.TensorSpec((None, *s.shape), kind)

        if isinstance(samples, Stream):
            x_spec, y_spec = samples.dataset.element_spec
            self.chunks = None
        else:
            x_spec, y_spec = (_map(lambda a: tf.TensorSpec(np.shape(a)[1:], tf.as_dtype(np.asarray(a).dtype)), samples.x),
                              tf.TensorSpec(np.shape(samples.y)[1:], tf.as_dtype(np.asarray(samples.y).dtype)))
            parts = [samples.rows(lo + a, min(lo + a + micro_batch, hi)) for a in range(0, self.n_samples, micro_batch)]
            self.chunks = [(_map(self._tensor, part.x), self._tensor(part.y)) for part in parts]
        self.spec = (tf.nest.map_structure(open_batch, x_spec), open_batch(y_spec))

    def _tensor(self, a):
        tf = runtime.import_tensorflow()

        if isinstance(a, np.ndarray) or np.isscalar(a):
            a = np.asarray(a)
            return tf.constant(a, self.dtype if a.dtype.kind == "f" else tf.as_dtype(a.dtype))
        return tf.cast(a, self.dtype) if a.dtype.is_floating else a

    def batches(self, rows: slice | None = None):
        """The (x, y) micro-batches covering this rank's rows `rows` (a slice of local row
        indices, contiguous; all if None): micro-batches of the whole block, cut where the
        slice starts or stops inside one."""
        start, stop = 0, self.n_samples
        if rows is not None:
            start, stop, step = rows.indices(self.n_samples)
            if step != 1:
                raise ValueError(f"rows must be a contiguous slice, got {rows}")
        if self.chunks is None:
            for x, y in self.samples.batches(self.lo + start, self.lo + stop, self.micro_batch):
                yield _map(self._tensor, x), self._tensor(y)
            return
        for c0, (x, y) in zip(range(0, self.n_samples, self.micro_batch), self.chunks):
            a, b = max(start, c0) - c0, min(stop, c0 + len(y)) - c0
            if a < b:
                yield (x, y) if (a, b) == (0, len(y)) else (_map(lambda t: t[a:b], x), y[a:b])
