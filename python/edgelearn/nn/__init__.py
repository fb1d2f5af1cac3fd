"""``edgelearn.nn``: PyTorch-like modules. Linear/Conv2d switch to Octo INT8 mode with ``edgelearn.octo``."""

from .. import functional
from ..octo_config import OctoConfig
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
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "BatchNorm2d",
    "Compensation",
    "Conv2d",
    "CrossEntropyLoss",
    "Dropout",
    "Flatten",
    "Hardswish",
    "Identity",
    "Linear",
    "MaxPool2d",
    "MSELoss",
    "Module",
    "OctoConfig",
    "Parameter",
    "ReLU",
    "ReLU6",
    "Sequential",
    "Sigmoid",
    "functional",
    "manual_seed",
    "octo",
]
