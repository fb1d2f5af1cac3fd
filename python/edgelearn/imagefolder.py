"""Your own images: :class:`ImageFolder` (torchvision's layout, decoded with Pillow on the fly) and
:func:`load_image_folder` (the train/validation pair ``--dataset folder:PATH`` uses).

A board cannot hold ten thousand images as float32, so nothing here makes a float32 copy of a dataset: files are
decoded per batch (optionally kept as a uint8 cache of the resized images), cropped, flipped, and only the batch
is turned into normalised float32. Files that are not images, or that Pillow cannot read, are skipped with one
warning that counts them; an image that fails to decode mid-epoch is replaced by another image of its class and
counted, never a crash.

Exposed as ``edgelearn.data.ImageFolder`` and ``edgelearn.data.load_image_folder``.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "load_image_folder"]

#: File suffixes taken as images (case-insensitive), as torchvision's ImageFolder.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_VAL_NAMES = ("val", "valid", "validation", "test")
#: Pillow's own decompression-bomb guard, made explicit: no image above this many pixels is decoded.
MAX_IMAGE_PIXELS = 1 << 26

PathLike = Union[str, "os.PathLike[str]"]
Size = Union[int, Tuple[int, int]]


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError('image folders need Pillow: pip install "edgelearn[images]" (or: pip install pillow)') from exc
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    return Image


def _class_dirs(root: str) -> List[str]:
    return sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))


def _scan(root: str, classes: Sequence[str]) -> Tuple[List[str], np.ndarray, List[Tuple[str, str]]]:
    """Image files under ``root/<class>/`` (recursively), their labels, and the skipped files with reasons."""
    Image = _pil()
    files: List[str] = []
    labels: List[int] = []
    skipped: List[Tuple[str, str]] = []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, names in os.walk(os.path.join(root, cls), followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(names):
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                if not name.lower().endswith(IMAGE_EXTENSIONS):
                    skipped.append((path, "not an image"))
                    continue
                try:
                    with Image.open(path) as im:
                        im.verify()
                except Exception as exc:  # Pillow raises many types for bad files: all mean "unreadable"
                    skipped.append((path, f"corrupt ({type(exc).__name__})"))
                    continue
                files.append(path)
                labels.append(label)
    return files, np.asarray(labels, np.int64), skipped


def _warn_skipped(root: str, skipped: List[Tuple[str, str]]) -> None:
    if not skipped:
        return
    not_images = sum(1 for _, why in skipped if why == "not an image")
    examples = ", ".join(f"{os.path.relpath(p, root)} ({why})" for p, why in skipped[:3])
    warnings.warn(f"ImageFolder {root}: skipped {len(skipped)} file(s): {not_images} not images, "
                  f"{len(skipped) - not_images} corrupt; e.g. {examples}", stacklevel=3)


def _stratified(labels: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    from .data import _stratified_split

    return _stratified_split(labels, fraction, seed)


class ImageFolder:
    """Images in one folder per class (``root/<class>/<file>``), as a dataset for ``DataLoader`` and ``fit``.

    - ``image_size``: output side (int) or ``(height, width)``; ``None`` takes the first image's size.
    - ``resize``: the shorter side is scaled to this before cropping (default ``image_size``: no crop margin;
      ``round(image_size / 0.875)`` is the ImageNet recipe). A ``(height, width)`` image size resizes to exactly
      that.
    - ``train``: random crop (where the resized image is larger) and, with ``flip``, random horizontal flips;
      otherwise a center crop.
    - ``channels``: 3 (RGB) or 1 (grayscale). ``mean``/``std``: per-channel normalisation of ``[0, 1]`` pixels
      (default none, as the other datasets; ``IMAGENET_MEAN``/``IMAGENET_STD`` for torchvision models).
    - ``cache``: keep each resized image as uint8 after its first decode (memory: H·W·C bytes per image).
    - ``files``/``labels``/``classes``: build from an explicit list instead of scanning ``root``.
    - ``workers``: decoding threads per batch (Pillow releases the GIL while decoding).

    ``images`` are never held as float32: :meth:`load_batch` decodes a batch. ``labels`` (int64) and
    ``classes`` are in memory. ``dataset[i]`` gives one ``(image float32 (C, H, W), label)``.
    """

    IMAGENET_MEAN = (0.485, 0.456, 0.406)
    IMAGENET_STD = (0.229, 0.224, 0.225)

    def __init__(self, root: PathLike, image_size: Optional[Size] = None, *, train: bool = False,
                 resize: Optional[int] = None, channels: int = 3, mean: Union[float, Sequence[float]] = 0.0,
                 std: Union[float, Sequence[float]] = 1.0, flip: bool = True, cache: bool = False,
                 files: Optional[Sequence[str]] = None, labels: Optional[Sequence[int]] = None,
                 classes: Optional[Sequence[str]] = None, name: Optional[str] = None, workers: Optional[int] = None):
        self.root = os.fspath(root)
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 or 3, got {channels}")
        if files is None:
            if not os.path.isdir(self.root):
                raise FileNotFoundError(f"image folder not found: {self.root}")
            self.classes = tuple(classes) if classes is not None else tuple(_class_dirs(self.root))
            if not self.classes:
                raise ValueError(f"{self.root}: no class folders (expected {self.root}/<class>/<image files>)")
            found, found_labels, skipped = _scan(self.root, self.classes)
            _warn_skipped(self.root, skipped)
            self.files, self.labels = found, found_labels
            self.skipped = len(skipped)
        else:
            self.files = [os.fspath(f) for f in files]
            self.labels = np.asarray(labels if labels is not None else [], np.int64)
            if len(self.labels) != len(self.files):
                raise ValueError(f"labels: {len(self.labels)} labels for {len(self.files)} files")
            self.classes = tuple(classes) if classes is not None else tuple(
                str(i) for i in range(int(self.labels.max()) + 1 if len(self.labels) else 0))
            self.skipped = 0
        if not self.files:
            raise ValueError(f"{self.root}: no readable images")
        self.channels = int(channels)
        self.train = bool(train)
        self.flip = bool(flip)
        if image_size is None:
            with _pil().open(self.files[0]) as im:
                image_size = (im.size[1], im.size[0])
        if isinstance(image_size, (tuple, list)):
            h, w = (int(v) for v in image_size)
            self.size, self.exact = (h, w), True
        else:
            h = w = int(image_size)
            self.size, self.exact = (h, w), False
        if min(h, w) < 1 or h * w > MAX_IMAGE_PIXELS:
            raise ValueError(f"image_size: {image_size} out of range")
        self.resize = int(resize) if resize is not None else max(h, w)
        if self.resize < max(h, w):
            raise ValueError(f"resize: {self.resize} is smaller than the image size {self.size}")
        self.mean = np.broadcast_to(np.asarray(mean, np.float32), (self.channels,)).reshape(1, -1, 1, 1).copy()
        self.std = np.broadcast_to(np.asarray(std, np.float32), (self.channels,)).reshape(1, -1, 1, 1).copy()
        if (self.std <= 0).any():
            raise ValueError(f"std: expected positive values, got {std}")
        self.cache: Optional[List[Optional[np.ndarray]]] = [None] * len(self.files) if cache else None
        self.workers = int(workers) if workers else min(4, os.cpu_count() or 1)
        self.name = name or os.path.basename(self.root.rstrip("/")) or "folder"
        self.decode_failures = 0
        self._by_class = {int(c): np.flatnonzero(self.labels == c) for c in np.unique(self.labels)}

    # --- dataset protocol ---
    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return (self.channels,) + self.size

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.int64]:
        return self.load_batch(np.asarray([index]))[0], self.labels[index]

    def __repr__(self) -> str:
        return (f"ImageFolder(root={self.root!r}, n={len(self)}, image_shape={self.image_shape}, "
                f"num_classes={self.num_classes}, train={self.train})")

    # --- decoding ---
    def _decode(self, index: int) -> np.ndarray:
        """The resized (not yet cropped) image as uint8 (H, W, C)."""
        if self.cache is not None and self.cache[index] is not None:
            return self.cache[index]
        Image = _pil()
        with Image.open(self.files[index]) as im:
            im = im.convert("RGB" if self.channels == 3 else "L")
            w, h = im.size
            if self.exact:
                target = (self.size[1], self.size[0])
            else:
                scale = self.resize / min(w, h)
                target = (max(self.size[1], round(w * scale)), max(self.size[0], round(h * scale)))
            if target != (w, h):
                im = im.resize(target, Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self.cache is not None:
            self.cache[index] = arr
        return arr

    def _one(self, index: int, u: Tuple[float, float, float], train: bool) -> np.ndarray:
        try:
            img = self._decode(index)
        except Exception:  # decoding failed after the scan passed (e.g. truncated data): use a sibling image
            self.decode_failures += 1
            warnings.warn(f"ImageFolder {self.root}: cannot decode {self.files[index]}; used another image of its "
                          f"class ({self.decode_failures} decode failure(s) so far)", stacklevel=4)
            siblings = [int(i) for i in self._by_class[int(self.labels[index])] if i != index]
            if not siblings:
                return np.zeros(self.size + (self.channels,), np.uint8)
            return self._one(siblings[int(u[0] * len(siblings)) % len(siblings)], u, train)
        h, w = self.size
        H, W = img.shape[:2]
        if train:
            top, left = int(u[0] * (H - h + 1)), int(u[1] * (W - w + 1))
        else:
            top, left = (H - h) // 2, (W - w) // 2
        img = img[top:top + h, left:left + w]
        if train and self.flip and u[2] < 0.5:
            img = img[:, ::-1]
        return img

    def load_batch(self, indices: Sequence[int], rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """Float32 ``(B, C, H, W)``: the images at ``indices`` decoded, cropped, flipped (train mode, drawn from
        ``rng``; center crop and no flip without one) and normalised."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        train = self.train and rng is not None
        u = rng.random((len(idx), 3)) if train else np.full((len(idx), 3), 0.9)
        if self.workers > 1 and len(idx) > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                imgs = list(pool.map(self._one, idx.tolist(), map(tuple, u), [train] * len(idx)))
        else:
            imgs = [self._one(int(i), tuple(v), train) for i, v in zip(idx, u)]
        batch = np.stack(imgs).transpose(0, 3, 1, 2).astype(np.float32)  # only the batch becomes float32
        batch *= np.float32(1.0 / 255.0)
        batch -= self.mean
        batch /= self.std
        return np.ascontiguousarray(batch)

    def subset(self, indices: Sequence[int], *, train: bool, name: Optional[str] = None) -> "ImageFolder":
        """The images at ``indices`` as a new ImageFolder with the same decoding settings."""
        idx = np.asarray(indices, np.int64)
        out = ImageFolder.__new__(ImageFolder)
        out.__dict__.update(self.__dict__)
        out.files = [self.files[i] for i in idx]
        out.labels = self.labels[idx].copy()
        out.train = bool(train)
        out.name = name or self.name
        out.cache = [None] * len(out.files) if self.cache is not None else None
        out.decode_failures = 0
        out._by_class = {int(c): np.flatnonzero(out.labels == c) for c in np.unique(out.labels)}
        return out


def load_image_folder(root: PathLike, image_size: Optional[Size] = None, *, val_fraction: float = 0.2,
                      seed: int = 0, **options):
    """``Splits(train, val)`` of :class:`ImageFolder` from ``root``: ``root/train/`` and ``root/val/`` (or
    ``valid``/``validation``/``test``) when both exist, each with one folder per class; otherwise one folder per
    class split per class by ``val_fraction`` with ``seed``. The train part decodes with random crop and flip.
    ``options`` go to :class:`ImageFolder` (``channels``, ``mean``, ``std``, ``resize``, ``cache``, ...).
    """
    from .data import Splits

    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    subdirs = _class_dirs(root)
    val_dir = next((d for d in _VAL_NAMES if d in subdirs), None)
    name = os.path.basename(root.rstrip("/")) or "folder"
    if "train" in subdirs and val_dir is not None:
        train = ImageFolder(os.path.join(root, "train"), image_size, train=True, name=f"{name}-train", **options)
        val = ImageFolder(os.path.join(root, val_dir), train.size if image_size is None else image_size,
                          train=False, classes=train.classes, name=f"{name}-{val_dir}", **options)
        return Splits(train, val)
    whole = ImageFolder(root, image_size, name=name, **options)
    tr, va = _stratified(whole.labels, val_fraction, seed)
    return Splits(whole.subset(tr, train=True, name=f"{name}-train"), whole.subset(va, train=False, name=f"{name}-val"))
