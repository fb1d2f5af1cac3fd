"""The model zoo: an MLP and the small CNN of ``docs/octo.md``, and edge architectures in torchvision's module
layout and parameter names (a torchvision ``state_dict`` maps 1:1 by name and shape): ``mobilenet_v2``
(depthwise convolutions, inverted residuals, ReLU6), ``resnet18`` and the CIFAR-style ``resnet20``.

All are plain FP32 models; turn them to INT8 training with ``edgelearn.octo(model, config)``. Parameter
initialisation draws from the generator ``edgelearn.nn.manual_seed`` seeds, so call that first for a
reproducible model. Small inputs (28x28, 32x32): ``mobilenet_v2(small_input=True)`` and
``resnet18(small_input=True)`` adapt the stem as the CIFAR variants do (see their modules);
``build_model`` picks that for images smaller than 64 pixels.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

from .. import nn
from .mobilenet import MobileNetV2, mobilenet_v2
from .resnet import ResNet, resnet18, resnet20

__all__ = [
    "MODEL_NAMES",
    "VIDEO_MODEL_NAMES",
    "MobileNetV2",
    "ResNet",
    "build_model",
    "build_video_model",
    "cnn",
    "fcn",
    "fcn_weights",
    "mlp",
    "mobilenet_v2",
    "resnet18",
    "resnet20",
]

MODEL_NAMES = ("mlp", "cnn", "resnet20", "resnet18", "mobilenet_v2")
#: Below this image size (pixels on the shorter side) ``build_model`` adapts the stems of the ImageNet nets.
SMALL_INPUT = 64
#: Built-in architectures of ``edgelearn video --model`` (3-channel input, any frame size): the zoo's backbones
#: (with their pooled classifiers) besides the fully convolutional ``fcn``.
VIDEO_MODEL_NAMES = ("fcn", "cnn", "resnet20", "resnet18", "mobilenet_v2")
#: Trained weights of the default :func:`fcn` (3 input channels, 16 outputs), shipped with the package: see
#: :func:`fcn_weights`.
FCN_WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "fcn.safetensors")


def mlp(in_features: int, *widths: int) -> nn.Sequential:
    """``Flatten`` then Linear layers ``in_features -> widths[0] -> ... -> widths[-1]`` with ReLU between them.

    The last width is the number of classes: ``mlp(784, 256, 128, 10)`` is the 784-256-128-10 MLP of the
    benchmarks (also what ``mlp(784)`` builds).
    """
    if not widths:
        widths = (256, 128, 10)
    if in_features < 1 or any(w < 1 for w in widths):
        raise ValueError(f"mlp: layer sizes must be positive, got {(in_features, *widths)}")
    layers: List[nn.Module] = [nn.Flatten()]
    sizes = (in_features, *widths)
    for i in range(len(widths)):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i + 1 < len(widths):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn(
    in_channels: int,
    classes: int,
    image_size: Union[int, Tuple[int, int]] = 28,
    channels: Sequence[int] = (16, 32, 64),
) -> nn.Sequential:
    """Three 3x3 convolutions (padding 1, default widths 16-32-64), each followed by BatchNorm2d and ReLU;
    a 2x2 max-pool after each of the first two while the feature map is still at least 4 pixels on a side
    (28x28 -> 14 -> 7; 8x8 -> 4 -> 2); then global average pooling and one Linear to ``classes``.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if in_channels < 1 or classes < 2 or h < 1 or w < 1:
        raise ValueError(f"cnn: bad shape (in_channels={in_channels}, classes={classes}, image_size={image_size})")
    layers = []
    prev = in_channels
    for i, ch in enumerate(channels):
        layers += [nn.Conv2d(prev, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU()]
        if i < len(channels) - 1 and i < 2 and min(h, w) >= 4:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        prev = ch
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, classes)]
    return nn.Sequential(*layers)


def _check_width_mult(name: str, width_mult: float) -> None:
    if width_mult != 1.0 and name != "mobilenet_v2":
        raise ValueError(f"width_mult (--width-mult) applies only to mobilenet_v2, not to {name!r} "
                         f"(got {width_mult}); leave it at 1.0")


def build_model(name: str, image_shape: Tuple[int, int, int], classes: int, width_mult: float = 1.0) -> nn.Module:
    """The zoo model ``name`` (one of ``MODEL_NAMES``) sized for images of ``(C, H, W)`` and ``classes``
    classes; ``width_mult`` scales ``mobilenet_v2`` (any other model refuses a value other than 1.0 rather
    than ignore it). ImageNet stems adapt to images below 64 pixels."""
    _check_width_mult(name, width_mult)
    c, h, w = image_shape
    small = min(h, w) < SMALL_INPUT
    if name == "mlp":
        return mlp(c * h * w, 256, 128, classes)
    if name == "cnn":
        return cnn(c, classes, (h, w))
    if name == "resnet20":
        return resnet20(classes, c)
    if name == "resnet18":
        return resnet18(classes, c, small_input=small)
    if name == "mobilenet_v2":
        return mobilenet_v2(classes, width_mult, c, small_input=small)
    raise ValueError(f"model: unknown name {name!r}; expected one of {', '.join(MODEL_NAMES)}")


def fcn(in_channels: int = 3, channels: Sequence[int] = (16, 32, 32, 64), out_channels: int = 16) -> nn.Sequential:
    """A fully convolutional feature extractor for video: per width in ``channels`` a 3x3 convolution (padding 1;
    stride 2 on every second one) with BatchNorm2d and ReLU, then a 1x1 convolution to ``out_channels``
    (a dense feature map at 1/4 resolution with the defaults). Works on any frame size."""
    if in_channels < 1 or out_channels < 1 or not channels or any(c < 1 for c in channels):
        raise ValueError(f"fcn: bad widths (in_channels={in_channels}, channels={tuple(channels)}, out_channels={out_channels})")
    layers = []
    prev = in_channels
    for i, ch in enumerate(channels):
        layers += [nn.Conv2d(prev, ch, 3, stride=2 if i % 2 else 1, padding=1), nn.BatchNorm2d(ch), nn.ReLU()]
        prev = ch
    layers.append(nn.Conv2d(prev, out_channels, 1))
    return nn.Sequential(*layers)


def fcn_weights() -> Dict[str, np.ndarray]:
    """The shipped weights of the default :func:`fcn` (``fcn()``: 3 input channels, widths 16-32-32-64, 16
    outputs) as a float32 ``state_dict`` (without ``num_batches_tracked``).

    Trained (``scripts/train_fcn_weights.py``) on a self-supervised per-pixel task over real photos (the RGB
    images of Debian's ``opencv-doc``, not its videos): each output pixel (1/4 resolution) classifies the local
    structure of its 4x4 input block from the structure tensor of the luma: output 0 "flat", outputs 1-4 the
    edge orientation in 45-degree bins (1: horizontal edges, 2: rising diagonals, 3: vertical edges, 4: falling
    diagonals); outputs 5-15 are never the target. Trained with input noise (labels from the clean image, and
    the outputs on noisy inputs pulled towards those on clean ones), its argmax is a prediction that small
    sensor and codec noise does not flip, unlike a random head's near-ties,
    which makes the per-pixel agreement of patch skip with dense inference meaningful. Stored as float16
    (BatchNorm statistics float32), ~70 KB."""
    import safetensors.numpy as stn

    return {k: np.asarray(v, np.float32) for k, v in stn.load_file(FCN_WEIGHTS).items()}


def build_video_model(name: str, in_channels: int = 3, classes: int = 10, width_mult: float = 1.0,
                      pretrained: bool = False) -> nn.Module:
    """``"fcn"`` (see :func:`fcn`; with ``pretrained`` and 3 input channels, the shipped weights of
    :func:`fcn_weights`), ``"cnn"`` (the conv backbone of :func:`cnn` with its pooled classifier) or a
    zoo network with its ImageNet stem (video frames are large): ``"resnet20"``, ``"resnet18"``,
    ``"mobilenet_v2"`` (``width_mult`` scales it; the others refuse a value other than 1.0)."""
    _check_width_mult(name, width_mult)
    if name == "fcn":
        model = fcn(in_channels)
        if pretrained and in_channels == 3:
            state = fcn_weights()
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):  # not stored
                raise RuntimeError(f"{FCN_WEIGHTS}: does not fit fcn() (missing {missing}, unexpected {unexpected})")
        return model
    if name == "cnn":
        return cnn(in_channels, classes, 28)
    if name in ("resnet20", "resnet18", "mobilenet_v2"):
        return build_model(name, (in_channels, SMALL_INPUT, SMALL_INPUT), classes, width_mult)
    raise ValueError(f"model: unknown name {name!r}; expected one of {', '.join(VIDEO_MODEL_NAMES)} or a checkpoint path")
