"""Inference with a trained checkpoint: read images the way the training data was read, return class probabilities.

``read_inputs(path, image_shape)`` takes an image file (anything Pillow opens), an IDX image file (uint8 scaled
to ``[0, 1]`` as ``load_idx`` does, float types as they are) or a folder of images (with one subfolder per class,
the folder names are the labels); ``predict(model, images)`` returns softmax probabilities in eval mode.

What does not live here: rebuilding the model (``edgelearn.run.load_trained``) and training.
"""

from __future__ import annotations

import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "Inputs", "predict", "read_inputs"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


class Inputs(NamedTuple):
    """Images as float32 ``(N, C, H, W)`` in ``[0, 1]``, a name per image, and labels (class names) if known."""

    images: np.ndarray
    names: List[str]
    labels: Optional[List[str]]


def _is_idx(path: str) -> bool:
    from .data import _open_maybe_gzip

    with _open_maybe_gzip(path) as f:
        head = f.read(4)
    return len(head) == 4 and head[:2] == b"\0\0"


def _load_image(path: str, image_shape: Tuple[int, int, int], invert: bool) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError('reading image files needs Pillow: pip install pillow') from exc
    c, h, w = image_shape
    try:
        with Image.open(path) as im:
            im = im.convert("L" if c == 1 else "RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) * np.float32(1.0 / 255.0)
    except OSError as exc:
        raise ValueError(f"{path}: not an image Pillow can read ({exc})") from exc
    if c == 1:
        arr = arr[None]
    elif c == 3:
        arr = arr.transpose(2, 0, 1)
    else:
        raise ValueError(f"{path}: the model takes {c}-channel images; image files give 1 or 3 channels")
    return 1.0 - arr if invert else arr


def _idx_images(path: str, image_shape: Tuple[int, int, int]) -> np.ndarray:
    from .data import read_idx

    raw = read_idx(path)
    if raw.ndim == 2:
        raw = raw[None]
    if raw.ndim not in (3, 4):
        raise ValueError(f"{path}: expected IDX images (N, H, W) or (N, H, W, C), got shape {raw.shape}")
    x = raw.astype(np.float32) * np.float32(1.0 / 255.0) if raw.dtype == np.uint8 else raw.astype(np.float32)
    x = x[:, None] if x.ndim == 3 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(f"{path}: images of shape {tuple(x.shape[1:])} (C, H, W), but the model was trained on "
                         f"{tuple(image_shape)}")
    return x


def read_inputs(path: "os.PathLike[str] | str", image_shape: Sequence[int], *, labels: Optional[str] = None,
                classes: Sequence[str] = (), invert: bool = False) -> Inputs:
    """Read ``path`` (image file, IDX image file or folder) as the model's ``image_shape`` ``(C, H, W)``.

    ``labels``: an IDX label file for IDX images (class indices). A folder whose subfolders are named after
    classes is labelled by them. ``invert``: ``1 - x`` (dark ink on white paper, for models trained on
    light-on-dark digits)."""
    path = os.fspath(path)
    shape = tuple(int(v) for v in image_shape)
    if not os.path.exists(path):
        raise FileNotFoundError(f"input not found: {path}")
    if os.path.isdir(path):
        entries = sorted(os.listdir(path))
        subdirs = [e for e in entries if os.path.isdir(os.path.join(path, e))]
        files: List[Tuple[str, Optional[str]]] = []
        for d in subdirs:
            files += [(os.path.join(path, d, f), d) for f in sorted(os.listdir(os.path.join(path, d)))
                      if f.lower().endswith(IMAGE_SUFFIXES)]
        files += [(os.path.join(path, f), None) for f in entries if f.lower().endswith(IMAGE_SUFFIXES)]
        if not files:
            raise ValueError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it or its subfolders")
        images = np.stack([_load_image(f, shape, invert) for f, _ in files])
        names = [os.path.relpath(f, path) for f, _ in files]
        known = [d for _, d in files]
        return Inputs(images, names, known if all(d is not None for d in known) else None)
    if _is_idx(path):
        x = _idx_images(path, shape)
        y = None
        if labels is not None:
            from .data import read_idx

            raw = read_idx(labels)
            if raw.ndim != 1 or raw.dtype.kind not in "iu" or len(raw) != len(x):
                raise ValueError(f"{labels}: expected {len(x)} integer IDX labels, got {raw.dtype} shape {raw.shape}")
            names_of = list(classes) or [str(i) for i in range(int(raw.max()) + 1)]
            if int(raw.max()) >= len(names_of):
                raise ValueError(f"{labels}: label {int(raw.max())} but the model knows {len(names_of)} classes")
            y = [names_of[int(v)] for v in raw]
        return Inputs(x, [f"{os.path.basename(path)}[{i}]" for i in range(len(x))], y)
    if labels is not None:
        raise ValueError("--labels goes with IDX images; a folder is labelled by its class subfolders")
    return Inputs(_load_image(path, shape, invert)[None], [os.path.basename(path)], None)


def predict(model, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Softmax probabilities ``(N, classes)`` of ``model`` (put in eval mode) on float32 ``(N, C, H, W)``.

    Batches of ``batch_size`` as :func:`edgelearn.evaluate` uses (an INT8 model quantizes each batch's
    activations with one scale, so the batching is part of the result)."""
    from .tensor import no_grad, tensor

    model.eval()
    out = []
    with no_grad():
        for i in range(0, len(images), batch_size):
            logits = model(tensor(np.ascontiguousarray(images[i:i + batch_size], dtype=np.float32))).numpy()
            z = logits - logits.max(axis=1, keepdims=True)
            e = np.exp(z)
            out.append(e / e.sum(axis=1, keepdims=True))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
