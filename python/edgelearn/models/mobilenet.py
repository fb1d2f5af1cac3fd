"""MobileNetV2 (Sandler et al. 2018) in torchvision's module layout and parameter names.

``mobilenet_v2(...).state_dict()`` has torchvision's keys and shapes for the same ``num_classes`` and
``width_mult`` (``features.0.0.weight``, ``features.1.conv.0.0.weight`` (depthwise), ``features.2.conv.1.1.*``,
``features.18.0.weight``, ``classifier.1.weight``, ...), so a torchvision state dict loads with
``load_state_dict(strict=True)``.

Small inputs: ``small_input=True`` (what ``edgelearn train`` picks for images below 64 pixels) runs the stem
and the first stride-2 stage (24 channels) at stride 1, as the CIFAR variants of MobileNetV2 do: a 32x32 image
then goes 32 -> 32 -> 16 -> 8 -> 4 (instead of 16 -> 1 at stride 32, which leaves nothing to convolve). Strides
carry no parameters, so the state dict is the same either way.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np

from .. import functional as F
from .. import nn
from ..nn.module import run_chain
from .resnet import _kaiming_normal_fan_out

__all__ = ["Conv2dNormActivation", "InvertedResidual", "MobileNetV2", "mobilenet_v2"]

# (expansion t, output channels c, repeats n, first stride s), the paper's Table 2
_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """torchvision's channel rounding: nearest multiple of ``divisor``, never more than 10% below ``v``."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dNormActivation(nn.Sequential):
    """``Conv2d`` (no bias, "same" padding) -> ``BatchNorm2d`` -> ``ReLU6``, as items 0, 1, 2 (torchvision's
    ``ConvBNReLU``)."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    """1x1 expansion (unless ``expand_ratio`` is 1), 3x3 depthwise, 1x1 linear projection with BatchNorm, in
    one ``Sequential`` named ``conv``; the input is added back when stride is 1 and the channels match."""

    samplewise_forward = True  # its forward mixes no samples (its layers may: see Module.samplewise)

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride: expected 1 or 2, got {stride}")
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden, kernel_size=1))
        layers += [
            Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Any) -> Any:
        if self.use_res_connect:
            return F.residual_add(self.conv(x), x)  # saves nothing: saved activations stay 8-bit in INT8 mode
        return self.conv(x)


class MobileNetV2(nn.Module):
    """``features`` (stem, 17 inverted residual blocks, 1x1 head conv), global average pooling, ``classifier``
    (``Dropout(0.2)``, ``Linear``)."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3,
                 small_input: bool = False, dropout: float = 0.2, round_nearest: int = 8):
        super().__init__()
        if num_classes < 1 or in_channels < 1 or not width_mult > 0:
            raise ValueError(f"mobilenet_v2: bad sizes (num_classes={num_classes}, width_mult={width_mult}, "
                             f"in_channels={in_channels})")
        input_channel = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: List[nn.Module] = [Conv2dNormActivation(in_channels, input_channel, stride=1 if small_input else 2)]
        for idx, (t, c, n, s) in enumerate(_SETTING):
            out = _make_divisible(c * width_mult, round_nearest)
            if small_input and idx == 1:
                s = 1
            for i in range(n):
                features.append(InvertedResidual(input_channel, out, s if i == 0 else 1, t))
                input_channel = out
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _kaiming_normal_fan_out(m.weight)
            elif isinstance(m, nn.Linear):
                from ..nn import init

                m.weight.data[...] = (init.generator().standard_normal(m.weight.shape) * 0.01).astype(np.float32)
                if m.bias is not None:
                    m.bias.data[...] = 0

    def split_chain(self) -> List[Tuple[str, nn.Module]]:
        """The parts ``forward`` applies in order, by name (where split learning may cut: ``features.7``,
        ``avgpool``, ...; see :func:`edgelearn.collab.split.split_model`)."""
        return [("features", self.features), ("avgpool", self.avgpool), ("flatten", nn.Flatten()),
                ("classifier", self.classifier)]

    def forward(self, x: Any) -> Any:
        x = self.features(x)
        x = self.avgpool(x)
        return run_chain(x.flatten(1), self.classifier._fusion_plan(), donate_input=True)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3,
                 small_input: bool = False) -> MobileNetV2:
    """MobileNetV2 with ``width_mult`` scaling every width (torchvision's rounding); see the module docs for
    ``small_input``."""
    return MobileNetV2(num_classes, width_mult, in_channels, small_input)
