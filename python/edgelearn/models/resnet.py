"""ResNets in torchvision's module layout and parameter names: ``resnet18`` (ImageNet layout) and the CIFAR-style
``resnet20`` (He et al. 2016, section 4.2: three stages of 16/32/64 channels, three basic blocks each).

``resnet18(...).state_dict()`` has exactly torchvision's keys and shapes (``conv1.weight``, ``bn1.*``,
``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``, ``fc.weight``, ...), so a torchvision state dict
loads with ``load_state_dict(strict=True)``. ``resnet20`` uses the same block (``BasicBlock``) with a 1x1
convolution + BatchNorm ``downsample`` where the shape changes (option B of the paper).

Small inputs: ``resnet18(small_input=True)`` (what ``edgelearn train`` picks for images below 64 pixels) swaps
the 7x7 stride-2 stem and its max-pool for a 3x3 stride-1 stem (``conv1.weight`` then has shape
``(64, C, 3, 3)``), as the CIFAR variants do; a 28x28 or 32x32 image then ends at 4x4 before pooling.
``resnet20`` is a CIFAR network already (3x3 stem, 32x32 -> 8x8).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from .. import functional as F
from .. import nn
from ..nn.module import fusion_plan, run_chain

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet20"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, ReLU between them, and the input added back (through ``downsample``
    when the shape changes), then ReLU. The main path runs as one chain (``run_chain``), so INT8 layers apply
    their LAC Compensation in their own op and BatchNorm/ReLU overwrite intermediates, as in a Sequential; the
    saved activations stay 8-bit in INT8 mode (the add saves nothing)."""

    samplewise_forward = True  # its forward mixes no samples (its layers may: see Module.samplewise)

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Any) -> Any:
        identity = x if self.downsample is None else self.downsample(x)
        out = run_chain(x, fusion_plan([self.conv1, self.bn1, self.relu, self.conv2, self.bn2]))
        out = F.residual_add(out, identity)
        return run_chain(out, [(self.relu, None)], donate_input=True)


def _downsample(inplanes: int, planes: int, stride: int) -> Optional[nn.Module]:
    if stride == 1 and inplanes == planes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))


class ResNet(nn.Module):
    """A ResNet of ``BasicBlock`` stages: stem (``conv1``, ``bn1``, ``relu``, ``maxpool``), ``layer1`` ..
    ``layerK`` (one ``Sequential`` per stage), ``avgpool``, ``fc`` — torchvision's names."""

    def __init__(self, layers: List[int], widths: List[int], num_classes: int = 1000, in_channels: int = 3,
                 stem: str = "imagenet"):
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"resnet: bad sizes (num_classes={num_classes}, in_channels={in_channels})")
        first = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, first, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, first, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"stem: expected 'imagenet' or 'cifar', got {stem!r}")
        self.bn1 = nn.BatchNorm2d(first)
        self.relu = nn.ReLU()
        inplanes = first
        self.stages = len(layers)
        for i, (n, planes) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(inplanes, planes, stride, _downsample(inplanes, planes, stride))]
            blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
            inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():  # torchvision's init: BN of the last conv of each block stays at 1
            if isinstance(m, nn.Conv2d):
                _kaiming_normal_fan_out(m.weight)

    def split_chain(self) -> List[Tuple[str, nn.Module]]:
        """The parts ``forward`` applies in order, by name (where split learning may cut: ``layer2``,
        ``layer3.1``, ...; see :func:`edgelearn.collab.split.split_model`)."""
        stages = [(f"layer{i + 1}", getattr(self, f"layer{i + 1}")) for i in range(self.stages)]
        return [("conv1", self.conv1), ("bn1", self.bn1), ("relu", self.relu), ("maxpool", self.maxpool), *stages,
                ("avgpool", self.avgpool), ("flatten", nn.Flatten()), ("fc", self.fc)]

    def forward(self, x: Any) -> Any:
        # one chain through the stem and every block: each stage's input is freed once its first block ran
        stages = [getattr(self, f"layer{i + 1}") for i in range(self.stages)]
        x = run_chain(x, fusion_plan([self.conv1, self.bn1, self.relu, self.maxpool, *stages, self.avgpool]))
        return self.fc(x.flatten(1))


def _kaiming_normal_fan_out(w: nn.Parameter) -> None:
    """He-normal initialisation with fan-out (torchvision's for ResNet and MobileNetV2 convolutions)."""
    import numpy as np

    from ..nn import init

    o, _, kh, kw = w.shape
    std = np.sqrt(2.0 / (o * kh * kw))
    w.data[...] = (init.generator().standard_normal(w.shape) * std).astype(np.float32)


def resnet18(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False) -> ResNet:
    """ResNet-18 (2-2-2-2 basic blocks, 64-128-256-512 channels), torchvision's layout and names; see the
    module docs for ``small_input``."""
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels,
                  stem="cifar" if small_input else "imagenet")


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-20: 3x3 stem of 16 channels, three stages of three basic blocks (16, 32, 64 channels; the
    last two start with stride 2), global average pooling, one Linear. 0.27 M parameters."""
    return ResNet([3, 3, 3], [16, 32, 64], num_classes, in_channels, stem="cifar")
