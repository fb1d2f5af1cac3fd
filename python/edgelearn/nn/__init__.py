"""``edgelearn.nn``: PyTorch-like modules. Linear/Conv2d switch to Octo INT8 mode with ``edgelearn.octo``."""

from .. import functional
from ..octo_config import OctoConfig
from .graph import Add, Clip, Concat, GlobalAvgPool, GraphModule, Hardsigmoid, Mul, Reshape, ZeroPad2d
from .octo import fp32, octo
from .init import manual_seed
from .layers import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm2d,
    Compensation,
    Conv2d,
    CrossEntropyLoss,
    Dropout,
    Flatten,
    Hardswish,
    Identity,
    Linear,
    MaxPool2d,
    MSELoss,
    ReLU,
    ReLU6,
    Sigmoid,
)
from .module import Module, Parameter, Sequential

__all__ = [
    "Add",
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "BatchNorm2d",
    "Clip",
    "Compensation",
    "Concat",
    "Conv2d",
    "CrossEntropyLoss",
    "Dropout",
    "Flatten",
    "GlobalAvgPool",
    "GraphModule",
    "Hardsigmoid",
    "Hardswish",
    "Identity",
    "Linear",
    "MaxPool2d",
    "MSELoss",
    "Mul",
    "Module",
    "OctoConfig",
    "Parameter",
    "ReLU",
    "ReLU6",
    "Reshape",
    "Sequential",
    "Sigmoid",
    "ZeroPad2d",
    "functional",
    "manual_seed",
    "octo",
]
