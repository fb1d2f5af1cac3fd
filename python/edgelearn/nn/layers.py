"""Layers. ``Linear`` and ``Conv2d`` run in FP32 or, after ``set_int8(config)`` (see ``edgelearn.octo``), in
Octo INT8 mode; every other layer has one mode. The numerics are in ``edgelearn.functional``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from .. import functional as F
from ..octo_config import OctoConfig
from ..tensor import Tensor, as_tensor
from . import init
from .module import Module, Parameter, _tree_changed

__all__ = [
    "Linear",
    "Conv2d",
    "BatchNorm2d",
    "ReLU",
    "ReLU6",
    "Hardswish",
    "Sigmoid",
    "MaxPool2d",
    "AvgPool2d",
    "AdaptiveAvgPool2d",
    "Flatten",
    "Dropout",
    "Compensation",
    "Identity",
    "CrossEntropyLoss",
    "MSELoss",
]

IntPair = Union[int, Tuple[int, int]]


class _QuantizedLayer(Module):
    """What Linear and Conv2d share: the FP32/INT8 switch and the per-step stochastic-rounding seed."""

    returns_private_output = True
    samplewise_forward = True

    int8: Optional[OctoConfig]
    layer_id: int

    def _init_mode(self) -> None:
        self.int8 = None
        self.layer_id = 0

    def set_int8(self, config: Optional[OctoConfig], layer_id: int = 0) -> None:
        """INT8 mode with ``config`` (``None`` = FP32). INT8 mode adds the ``quant_step`` buffer."""
        if getattr(self, "int8", None) is not config:
            _tree_changed()  # Sequential's cached fusion plan depends on the mode
        self.int8 = config
        self.layer_id = int(layer_id)
        if config is not None:
            if "quant_step" not in self._buffers:
                self.register_buffer("quant_step", np.zeros((), dtype=np.int64))
        elif "quant_step" in self._buffers:
            del self._buffers["quant_step"]

    def fuses_with(self, nxt: Any) -> bool:
        """True if ``nxt`` is a per-channel ``Compensation`` over this INT8 layer's outputs, which
        ``Sequential`` then applies inside this layer's forward (``compensation=nxt``)."""
        return (self.int8 is not None and isinstance(nxt, Compensation) and nxt.alpha.ndim == 1
                and nxt.alpha.shape[0] == self.out_features_or_channels)

    def _compensation_args(self, compensation: Optional["Compensation"]):
        if compensation is None:
            return None
        # fuses_with's test, reading the parameter table directly (this runs every step)
        ps = compensation._parameters if isinstance(compensation, Compensation) else None
        a = None if ps is None else ps.get("alpha")
        if self.int8 is None or a is None or a.data.ndim != 1 or a.data.shape[0] != self.out_features_or_channels:
            raise ValueError("compensation: expected a per-channel Compensation over this INT8 layer's outputs")
        return (a, ps["mu"], ps["beta"])

    def _weight_bias(self) -> Tuple[Any, Any]:
        """``(self.weight, self.bias)``, read from the parameter table when both are there (this runs every
        step; ``Module.__getattr__`` is the slow way), else as attributes (``bias`` set to ``None``)."""
        ps = self._parameters
        if "weight" in ps and "bias" in ps:
            return ps["weight"], ps["bias"]
        return self.weight, self.bias

    def _next_seed(self) -> int:
        """This step's rounding seed; the step counter advances on every training-mode forward."""
        counter = self._buffers["quant_step"]  # the table itself: runs every step
        step = int(counter)
        if self.training:
            counter[...] = step + 1
        return F.step_seed(self.int8.seed, self.layer_id, step)


class Linear(_QuantizedLayer):
    """``y = x·Wᵀ + b``; W (out_features, in_features). Input (N, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = Parameter(init.uniform_fan_in((out_features, in_features), in_features))
        self.bias = Parameter(init.uniform_fan_in((out_features,), in_features)) if bias else None
        if not bias:
            self.register_parameter("bias", None)
        self._init_mode()

    @property
    def out_features_or_channels(self) -> int:
        return self.out_features

    def forward(self, x: Any, compensation: Optional["Compensation"] = None) -> Tensor:
        """``compensation``: a ``Compensation`` to apply to the output in the same op (INT8 mode only)."""
        w, b = self._weight_bias()
        if self.int8 is None:
            if compensation is not None:
                raise ValueError("compensation: only an INT8-mode layer applies a Compensation itself")
            return F.linear(x, w, b)
        return F.linear_int8(x, w, b, self.int8, seed=self._next_seed(), training=self.training,
                             compensation=self._compensation_args(compensation))

    def extra_repr(self) -> str:
        mode = ", int8" if self.int8 is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{mode}"


class Conv2d(_QuantizedLayer):
    """2-D convolution, NCHW; W (out_channels, in_channels/groups, kh, kw) — PyTorch's signature and names.

    ``groups`` must divide both channel counts (``groups == in_channels``: depthwise, with a channel
    multiplier ``out_channels/in_channels``); grouped/depthwise and dilated convolutions run on the core's
    direct grouped kernels, in FP32 and, after ``edgelearn.octo``, in INT8.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
    ):
        super().__init__()
        groups = int(groups)
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups: {groups} must be a positive divisor of in_channels ({in_channels}) and "
                             f"out_channels ({out_channels})")
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode: only 'zeros' is supported, got {padding_mode!r}")
        kh, kw = F._pair(kernel_size, "kernel_size")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = (kh, kw)
        self.stride = F._pair(stride, "stride")
        self.padding = F._pair(padding, "padding")
        self.dilation = F._pair(dilation, "dilation")
        if min(self.dilation) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"stride/dilation must be positive and padding non-negative, got stride={self.stride}, "
                             f"padding={self.padding}, dilation={self.dilation}")
        self.groups = groups
        fan_in = in_channels // groups * kh * kw
        self.weight = Parameter(init.uniform_fan_in((out_channels, in_channels // groups, kh, kw), fan_in))
        self.bias = Parameter(init.uniform_fan_in((out_channels,), fan_in)) if bias else None
        if not bias:
            self.register_parameter("bias", None)
        self._init_mode()

    @property
    def out_features_or_channels(self) -> int:
        return self.out_channels

    def forward(self, x: Any, compensation: Optional["Compensation"] = None) -> Tensor:
        """``compensation``: a ``Compensation`` to apply to the output in the same op (INT8 mode only)."""
        w, b = self._weight_bias()
        if self.int8 is None:
            if compensation is not None:
                raise ValueError("compensation: only an INT8-mode layer applies a Compensation itself")
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        return F.conv2d_int8(
            x, w, b, self.int8, self.stride, self.padding,
            seed=self._next_seed(), training=self.training, compensation=self._compensation_args(compensation),
            dilation=self.dilation, groups=self.groups,
        )

    def extra_repr(self) -> str:
        mode = ", int8" if self.int8 is not None else ""
        extra = ""
        if self.dilation != (1, 1):
            extra += f", dilation={self.dilation}"
        if self.groups != 1:
            extra += f", groups={self.groups}"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}{extra}, bias={self.bias is not None}{mode}"
        )


class BatchNorm2d(Module):
    """Per-channel batch normalisation of (N, C, H, W); buffers ``running_mean``, ``running_var``,
    ``num_batches_tracked`` (PyTorch's names, so state dicts line up)."""

    returns_private_output = True
    samplewise_forward = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), float(momentum)
        self.weight = Parameter(np.ones(num_features, np.float32))
        self.bias = Parameter(np.zeros(num_features, np.float32))
        self.register_buffer("running_mean", np.zeros(num_features, np.float32))
        self.register_buffer("running_var", np.ones(num_features, np.float32))
        self.register_buffer("num_batches_tracked", np.zeros((), np.int64))
        self.save_int8 = False  # set by edgelearn.octo: keep the input for backward as int8
        #: Frozen statistics: normalise with the running statistics in training mode too and leave them as they
        #: are (what Keras does for a BatchNormalization with ``trainable=False``, and what a frozen layer of a
        #: tiny-training graph does). ``edgelearn.finetune.select_trainable`` sets it on BatchNorms it freezes.
        self.frozen = False

    def forward(self, x: Any, act: Tuple[Module, ...] = ()) -> Tensor:
        """``act``: the ReLU or ReLU6 (and 2x2 max pool) that follow (see :meth:`fuses_activation`), applied after
        this layer; in INT8 training on a donated input all in one op (``F.batch_norm2d_relu``)."""
        training = self.training and not self.frozen
        # the tables themselves, not Module.__getattr__ (this runs every step); buffers always live there
        ps, bs = self._parameters, self._buffers
        weight, bias = (ps["weight"], ps["bias"]) if "weight" in ps and "bias" in ps else (self.weight, self.bias)
        if training:
            bs["num_batches_tracked"][...] += 1
        if act and training and self.save_int8 and type(x) is Tensor:
            y = F.batch_norm2d_relu(x, weight, bias, bs["running_mean"], bs["running_var"],
                                    self.momentum, self.eps, pool=len(act) > 1, relu6=type(act[0]) is ReLU6)
            if y is not None:
                return y
        y = F.batch_norm2d(
            x, weight, bias, bs["running_mean"], bs["running_var"], training, self.momentum, self.eps,
            save_int8=self.save_int8,
        )
        for m in act:  # as Sequential runs them: each output donated to the next
            if type(y) is Tensor and y._owned:
                y._donated = True
            y = m(y)
        if type(y) is Tensor:
            y._donated = False
        return y

    def fuses_activation(self, nxt: Sequence[Any]) -> int:
        """How many of the modules ``nxt`` (those that follow it) this layer applies itself in INT8 mode (as
        ``act`` of :meth:`forward`): a ReLU or ReLU6 that keeps a bit mask (1), then (ReLU only) a 2x2,
        stride-2, unpadded max pool (2); else 0."""
        if not (self.save_int8 and nxt and type(nxt[0]) in (ReLU, ReLU6) and nxt[0].save_mask):
            return 0
        if len(nxt) > 1 and type(nxt[1]) is MaxPool2d and type(nxt[0]) is ReLU:
            p = nxt[1]
            k = F._pair(p.kernel_size, "kernel_size")
            if k == (2, 2) and F._pair(p.kernel_size if p.stride is None else p.stride, "stride") == (2, 2) \
                    and F._pair(p.padding, "padding") == (0, 0):
                return 2
        return 1

    def samplewise(self) -> bool:
        """Batch statistics mix the samples: only in eval mode or with frozen statistics is this per sample."""
        return not self.training or self.frozen

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class ReLU(Module):
    returns_private_output = True
    samplewise_forward = True
    def __init__(self) -> None:
        super().__init__()
        self.save_mask = False  # set by edgelearn.octo: keep a 1-bit mask for backward, not the FP32 output

    def forward(self, x: Any) -> Tensor:
        return F.relu(x, save_mask=self.save_mask)


class ReLU6(Module):
    """``min(max(x, 0), 6)`` (MobileNetV2). ``inplace`` is accepted for PyTorch compatibility; in INT8 mode the
    output overwrites an input that ``Sequential`` donates, as for ``ReLU``."""

    returns_private_output = True
    samplewise_forward = True

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = bool(inplace)
        self.save_mask = False  # set by edgelearn.octo: keep a 1-bit mask for backward

    def forward(self, x: Any) -> Tensor:
        return F.relu6(x, save_mask=self.save_mask)


class Hardswish(Module):
    """``x·relu6(x + 3)/6``."""

    samplewise_forward = True

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = bool(inplace)

    def forward(self, x: Any) -> Tensor:
        return F.hardswish(x)


class Sigmoid(Module):
    samplewise_forward = True

    def forward(self, x: Any) -> Tensor:
        return F.sigmoid(x)


class MaxPool2d(Module):
    returns_private_output = True
    samplewise_forward = True
    def __init__(self, kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: Any) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool2d(MaxPool2d):
    def forward(self, x: Any) -> Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding)


class AdaptiveAvgPool2d(Module):
    """Average pooling to a fixed output size (the input size must be a multiple of it; 1 always works)."""

    returns_private_output = True
    samplewise_forward = True

    def __init__(self, output_size: IntPair = 1):
        super().__init__()
        self.output_size = output_size

    def forward(self, x: Any) -> Tensor:
        return F.adaptive_avg_pool2d(x, self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class Flatten(Module):
    """Flattens dimensions ``start_dim..end_dim`` (default: all but the batch dimension)."""

    samplewise_forward = True

    def samplewise(self) -> bool:
        return self.start_dim >= 1  # flattening the batch dimension mixes samples

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x: Any) -> Tensor:
        return as_tensor(x).flatten(self.start_dim, self.end_dim)


class Identity(Module):
    samplewise_forward = True

    def forward(self, x: Any) -> Tensor:
        return as_tensor(x)


class Dropout(Module):
    """Inverted dropout with its own seeded generator (``seed=None`` draws one from ``edgelearn.manual_seed``'s
    generator). The mask of step k depends only on (seed, k): the ``step`` buffer makes resumed runs exact."""

    def __init__(self, p: float = 0.5, seed: Optional[int] = None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: expected a probability in [0, 1], got {p}")
        self.p = float(p)
        self.seed = init.next_seed() if seed is None else int(seed)
        self.register_buffer("step", np.zeros((), np.int64), optional=True)

    def samplewise(self) -> bool:
        """Masks are drawn for the whole batch: per sample only when nothing is dropped."""
        return not self.training or self.p == 0.0

    def forward(self, x: Any) -> Tensor:
        if not self.training or self.p == 0.0:
            return as_tensor(x)
        step = int(self.step)
        self.step[...] = step + 1
        rng = np.random.default_rng([self.seed, step])
        return F.dropout(x, self.p, True, rng)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Compensation(Module):
    """Loss-aware compensation (LAC, Octo): ``y = x + α⊙μ + β``.

    Parameters ``alpha`` (init 1), ``mu`` and ``beta`` (init 1e-3·N(0,1)) have shape ``(C,)`` (broadcast over
    (N, C) or (N, C, H, W)) or, when ``shape`` is a tuple such as ``(C, H, W)``, that shape. Its loss term
    ``0.5·λ·(‖μ‖² + ‖β‖²)`` comes from ``regularization_term()``; ``Module.regularization()`` sums them.
    """

    returns_private_output = True
    samplewise_forward = True

    def __init__(self, shape: Union[int, Tuple[int, ...]], lam: float = 0.1):
        super().__init__()
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        self.lam = float(lam)
        gen = init.generator()
        self.alpha = Parameter(np.ones(shape, np.float32))
        self.mu = Parameter((1e-3 * gen.standard_normal(shape)).astype(np.float32))
        self.beta = Parameter((1e-3 * gen.standard_normal(shape)).astype(np.float32))

    def forward(self, x: Any) -> Tensor:
        return F.compensation(x, self.alpha, self.mu, self.beta)

    def regularization_term(self) -> Tensor:
        return F.compensation_penalty(self.mu, self.beta, self.lam)

    @staticmethod
    def regularization_terms(layers) -> Tensor:
        """The sum of several layers' ``regularization_term`` as one recorded op."""
        return F.compensation_penalties([(m.mu, m.beta, m.lam) for m in layers])

    def extra_repr(self) -> str:
        return f"{tuple(self.alpha.shape)}, lam={self.lam}"


class CrossEntropyLoss(Module):
    def __init__(self, label_smoothing: float = 0.0, reduction: str = "mean"):
        super().__init__()
        self.label_smoothing, self.reduction = label_smoothing, reduction

    def forward(self, logits: Any, target: Any) -> Tensor:
        return F.cross_entropy(logits, target, self.label_smoothing, self.reduction)


class MSELoss(Module):
    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, pred: Any, target: Any) -> Tensor:
        return F.mse(pred, target, self.reduction)
