"""Patch-skip inference of a conv net (a ``Sequential``, or a zoo backbone with residual blocks) over a stream
of video frames.

The model is translated once into the native runner (``edgelearn._native.PatchSkip``):

- ``Conv2d`` in FP32 mode keeps its weights and bias; in Octo INT8 mode (``edgelearn.octo``) its weights are
  quantized once exactly as the eval-mode layer quantizes them and it runs on the INT8 kernels;
- eval-mode ``BatchNorm2d`` and per-channel ``Compensation`` (LAC) become per-channel affines;
- ``ReLU``, ``ReLU6``, ``MaxPool2d``, ``AvgPool2d`` map one to one; ``Identity`` and ``Dropout`` (eval) vanish;
- the residual blocks of the zoo (``edgelearn.models``: ResNet ``BasicBlock`` with or without its
  ``downsample`` branch, MobileNetV2 ``InvertedResidual``) become their main path, the side branch and the add:
  a dirty region reaches the sum through either operand. ``ResNet`` and ``MobileNetV2`` run in the order of
  their ``split_chain``.

A classifier tail (from the first ``AdaptiveAvgPool2d``, ``Flatten`` or ``Linear`` on) runs densely through
the model's own modules after the conv part (it works on a pooled vector, so it is cheap). Any other layer
raises :class:`UnsupportedLayerError` naming it.

Per frame the runner flags input patches whose largest change since the cached reference exceeds
``threshold``, dilates them through each layer's receptive field and recomputes only those output pixels.
With ``threshold=0`` the output equals ``model(edgelearn.tensor(x[None]))`` in eval mode up to float32
rounding (FP32 convs; INT8 convs too with ``int8_scales="dynamic"``).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import _native
from ..functional import _pair, _quantize_weight
from ..nn import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm2d,
    Compensation,
    Conv2d,
    Dropout,
    Flatten,
    Identity,
    Linear,
    MaxPool2d,
    Module,
    ReLU,
    ReLU6,
    Sequential,
)
from ..tensor import no_grad, tensor

__all__ = ["PatchSkipRunner", "UnsupportedLayerError", "preprocess"]

#: ITU-R BT.601 luma weights: an RGB frame fed to a one-channel model becomes ``0.299 R + 0.587 G + 0.114 B``.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)

_TAIL_START = (AdaptiveAvgPool2d, Flatten, Linear)


class UnsupportedLayerError(TypeError):
    """The model contains a layer the patch-skip runner cannot run (it names the layer)."""


class _Mark:
    """Remember the current tensor as the next mark (numbered in order)."""


class _From:
    """The next layer reads mark ``k`` (a side branch)."""

    def __init__(self, k: int):
        self.k = k


class _Add:
    """Add mark ``k`` to the current tensor (a residual add)."""

    def __init__(self, k: int):
        self.k = k


def _flatten(model: Module, marks: Optional[List[int]] = None) -> List[Any]:
    """The layers of ``model`` in the order they run, with :class:`_Mark`/:class:`_From`/:class:`_Add` for the
    residual blocks of the zoo (``marks`` counts the marks handed out so far)."""
    from ..models.mobilenet import InvertedResidual, MobileNetV2
    from ..models.resnet import BasicBlock, ResNet

    if marks is None:
        marks = [0]

    def mark() -> int:
        marks[0] += 1
        return marks[0] - 1

    if isinstance(model, Sequential):
        out: List[Any] = []
        for m in model:
            out.extend(_flatten(m, marks))
        return out
    if isinstance(model, (ResNet, MobileNetV2)):
        out = []
        for _, m in model.split_chain():
            out.extend(_flatten(m, marks))
        return out
    if isinstance(model, BasicBlock):
        inp = mark()
        out = [_Mark()]
        for m in (model.conv1, model.bn1, model.relu, model.conv2, model.bn2):
            out.extend(_flatten(m, marks))
        if model.downsample is None:
            out.append(_Add(inp))
        else:
            main = mark()
            out += [_Mark(), _From(inp), *_flatten(model.downsample, marks), _Add(main)]
        return out + _flatten(model.relu, marks)
    if isinstance(model, InvertedResidual):
        if not model.use_res_connect:
            return _flatten(model.conv, marks)
        inp = mark()
        return [_Mark(), *_flatten(model.conv, marks), _Add(inp)]
    return [model]


def _arr(x: Any) -> np.ndarray:
    data = getattr(x, "data", x)
    return np.ascontiguousarray(np.asarray(data, dtype=np.float32))


def _channel_vector(v: Optional[Sequence[float]], name: str, channels: int) -> Optional[np.ndarray]:
    if v is None:
        return None
    a = np.asarray(v, dtype=np.float32).reshape(-1)
    if a.size == 1:
        a = np.repeat(a, channels)
    if a.size != channels:
        raise ValueError(f"{name}: expected 1 or {channels} values (one per channel), got {a.size}")
    if name == "std" and not np.all(a > 0):
        raise ValueError(f"std: every value must be positive, got {a.tolist()}")
    return a


def preprocess(
    frame: Any,
    channels: Optional[int] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> np.ndarray:
    """A video frame as the model's float32 ``(C, H, W)`` input.

    - uint8 ``(H, W, 3)`` RGB frames (what :func:`edgelearn.video.frames` yields) are divided by 255 (the
      ``[0, 1]`` scaling of ``edgelearn.data``), moved to channels-first and, when the model takes one
      channel (``channels=1``), turned into luma (BT.601); uint8 ``(H, W)`` or ``(H, W, 1)`` is grayscale.
    - float32 ``(C, H, W)`` frames are taken as they are (already the model's input).
    - ``mean``/``std`` (one value or one per channel) then normalise: ``(x - mean) / std``.
    """
    x = np.asarray(getattr(frame, "data", frame))
    if x.dtype == np.uint8:
        if x.ndim == 2:
            x = x[:, :, None]
        if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
            raise ValueError(f"frame: a uint8 frame must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {x.shape}")
        x = x[:, :, :3]
        chw = x.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
        if channels == 1 and chw.shape[0] == 3:
            chw = (LUMA[0] * chw[0] + LUMA[1] * chw[1] + LUMA[2] * chw[2])[None]
        elif channels == 3 and chw.shape[0] == 1:
            chw = np.repeat(chw, 3, axis=0)
    elif x.dtype == np.float32:
        if x.ndim != 3:
            raise ValueError(f"frame: a float32 frame must be (C, H, W), got shape {x.shape}")
        chw = x
    else:
        raise TypeError(f"frame: expected float32 (C, H, W) or uint8 (H, W, C), got dtype {x.dtype}")
    c = chw.shape[0]
    m, s = _channel_vector(mean, "mean", c), _channel_vector(std, "std", c)
    if m is not None:
        chw = chw - m[:, None, None]
    if s is not None:
        chw = chw / s[:, None, None]
    return np.ascontiguousarray(chw, dtype=np.float32)


class PatchSkipRunner:
    """Runs ``model`` over frames, skipping unchanged regions.

    Args:
        model: a ``Sequential`` (possibly nested) of ``Conv2d`` (FP32 or Octo INT8 mode; grouped, depthwise and
            dilated too), ``BatchNorm2d`` (its
            running statistics are used, as in eval mode), ``Compensation`` (per channel), ``ReLU``, ``ReLU6``,
            ``MaxPool2d``, ``AvgPool2d``, ``Identity``, ``Dropout`` (identity, as in eval mode) and the zoo's
            residual blocks, or a zoo ``ResNet``/``MobileNetV2``, optionally ending in a dense tail
            (``AdaptiveAvgPool2d``/``Flatten``/``Linear``/...).
        patch: side of the gate's input patches in pixels.
        threshold: a patch is recomputed when its max |change| over all channels (in the model's input
            units, e.g. [0, 1] for uint8 frames) since the cached reference exceeds this; 0 = any change.
            The reference is what the caches were computed from, so slow drifts add up and trip the gate.
        refresh_every: run densely every this many frames (0: only the first frame after a reset).
        error_bound: also run densely when the estimated error (relative L2 distance between the frame and
            the input the caches represent, ``stats["estimated_error"]``) passes this; 0 = off.
        tile: side of the output tiles recomputed per layer (1: exactly the pixels a change can reach).
        mean, std: normalisation applied after the /255 scaling of uint8 frames (see :func:`preprocess`).
        int8_scales: input scales of INT8 convs: ``"frozen"`` (default: calibrated whenever the layer is
            recomputed in full, held in between, so cached tiles stay valid) or ``"dynamic"`` (recomputed every
            frame as the model does; when a layer's scale moves, that layer is recomputed in full: exact,
            slower).
        dense_above: a layer whose dirty part covers at least this fraction of its output runs its dense kernel
            instead of the sparse one (cheaper there: no halo gathers, no small GEMMs).
        history: how many per-frame stats to keep in ``runner.history``.

    The layers' parameters are copied at construction; build a new runner after changing the model.
    """

    def __init__(
        self,
        model: Module,
        patch: int = 16,
        threshold: float = 0.0,
        refresh_every: int = 0,
        error_bound: float = 0.0,
        tile: int = 1,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        int8_scales: str = "frozen",
        dense_above: float = 0.85,
        history: int = 100_000,
    ):
        if int(patch) < 1:
            raise ValueError(f"patch: must be >= 1, got {patch}")
        if not float(threshold) >= 0.0:
            raise ValueError(f"threshold: must be >= 0, got {threshold}")
        if int(refresh_every) < 0:
            raise ValueError(f"refresh_every: must be >= 0 (0 = never), got {refresh_every}")
        if not float(error_bound) >= 0.0:
            raise ValueError(f"error_bound: must be >= 0 (0 = off), got {error_bound}")
        if int(tile) < 1:
            raise ValueError(f"tile: must be >= 1, got {tile}")
        if not 0.0 < float(dense_above) <= 1.0:
            raise ValueError(f"dense_above: must be in (0, 1], got {dense_above}")
        if int8_scales not in ("frozen", "dynamic"):
            raise ValueError(f"int8_scales: expected 'frozen' or 'dynamic', got {int8_scales!r}")
        self.patch, self.threshold, self.refresh_every = int(patch), float(threshold), int(refresh_every)
        self.error_bound, self.tile, self.int8_scales = float(error_bound), int(tile), int8_scales
        self.dense_above = float(dense_above)
        self._native = _native.PatchSkip(
            self.patch, self.threshold, self.refresh_every, self.tile, self.error_bound, self.int8_scales,
            self.dense_above,
        )
        self.in_channels: Optional[int] = None
        self.tail: List[Module] = []
        self._translate(_flatten(model))
        self.mean, self.std = mean, std
        self._shape: Optional[Tuple[int, ...]] = None
        self._tail_out: Optional[np.ndarray] = None
        self._stats: Dict[str, Any] = {}
        self.history: Deque[Dict[str, Any]] = deque(maxlen=int(history))

    def _translate(self, layers: List[Any]) -> None:
        count = 0
        for i, m in enumerate(layers):
            name = f"layer {i} ({type(m).__name__})"
            if isinstance(m, _Mark):
                self._native.add_mark()
                continue
            if isinstance(m, _From):
                self._native.add_from(m.k)
                continue
            if isinstance(m, _Add):
                self._native.add_residual(m.k)
                continue
            if isinstance(m, _TAIL_START):
                if count == 0:
                    raise UnsupportedLayerError(f"{name}: the model must start with a conv/pool part; "
                                                f"{type(m).__name__} would make the whole model a dense tail")
                if any(isinstance(t, (_Mark, _From, _Add)) for t in layers[i:]):
                    raise UnsupportedLayerError(f"{name}: a residual block after the dense tail's start cannot run "
                                                "densely after the runner")
                self.tail = layers[i:]
                break
            if isinstance(m, Conv2d):
                groups, dilation = int(getattr(m, "groups", 1)), tuple(getattr(m, "dilation", (1, 1)))
                if self.in_channels is None:
                    self.in_channels = m.in_channels
                bias = None if m.bias is None else _arr(m.bias)
                if m.int8 is not None:
                    wq, sw = _quantize_weight(_arr(m.weight), m.int8)
                    sw = np.atleast_1d(np.asarray(sw, np.float32)).copy()
                    self._native.add_conv_i8(np.ascontiguousarray(wq), sw, bias, tuple(m.stride), tuple(m.padding),
                                             groups, dilation)
                else:
                    self._native.add_conv(_arr(m.weight), bias, tuple(m.stride), tuple(m.padding), groups, dilation)
            elif isinstance(m, BatchNorm2d):
                self._native.add_batchnorm(
                    _arr(m.weight), _arr(m.bias), _arr(m.running_mean), _arr(m.running_var), float(m.eps)
                )
            elif isinstance(m, Compensation):
                a, mu, b = _arr(m.alpha), _arr(m.mu), _arr(m.beta)
                if a.ndim != 1:
                    raise UnsupportedLayerError(f"{name}: only per-channel Compensation (shape (C,)) can be folded, "
                                                f"got parameters of shape {a.shape}")
                # the same float32 arithmetic as functional.compensation: y = x + (α·μ + β)
                self._native.add_affine(np.ones_like(a), np.ascontiguousarray(a * mu + b, dtype=np.float32))
            elif isinstance(m, ReLU):
                self._native.add_relu()
            elif isinstance(m, ReLU6):
                self._native.add_relu6()
            elif isinstance(m, (MaxPool2d, AvgPool2d)):
                k = _pair(m.kernel_size, "kernel_size")
                s = k if m.stride is None else _pair(m.stride, "stride")
                p = _pair(m.padding, "padding")
                if isinstance(m, AvgPool2d):
                    self._native.add_avgpool(k, s, p)
                else:
                    self._native.add_maxpool(k, s, p)
            elif isinstance(m, (Identity, Dropout)):
                continue
            else:
                raise UnsupportedLayerError(
                    f"{name}: unsupported layer {type(m).__name__}; PatchSkipRunner supports Conv2d (FP32 or INT8), "
                    "BatchNorm2d, Compensation, ReLU, ReLU6, MaxPool2d, AvgPool2d, Identity and Dropout in a "
                    "Sequential (and the residual blocks of edgelearn.models), then an optional dense tail starting "
                    "at AdaptiveAvgPool2d, Flatten or Linear"
                )
            count += 1
        if count == 0:
            raise ValueError("model: has no layers the runner can run")

    def preprocess(self, frame: Any) -> np.ndarray:
        """``frame`` as this runner's model input (see :func:`preprocess`); use it for a dense baseline."""
        return preprocess(frame, self.in_channels, self.mean, self.std)

    def _run_tail(self, y: np.ndarray) -> np.ndarray:
        modes = [m.training for m in self.tail]
        try:
            out: Any = tensor(y)
            with no_grad():
                for m in self.tail:
                    m.training = False
                    out = m(out)
        finally:
            for m, mode in zip(self.tail, modes):
                m.training = mode
        return out.numpy()

    def _model_input_shape(self, frame: np.ndarray) -> Tuple[int, int, int]:
        """``(C, H, W)`` of the model input for a uint8 frame (as :func:`preprocess` would give it)."""
        cin = 1 if frame.ndim == 2 or frame.shape[2] == 1 else 3
        c = cin if self.in_channels is None or self.in_channels not in (1, 3) else self.in_channels
        return (c, int(frame.shape[0]), int(frame.shape[1]))

    def __call__(self, frame: Any) -> np.ndarray:
        """Output for ``frame`` (float32 ``(C, H, W)`` or uint8 ``(H, W, C)``): ``(1, C', H', W')`` for a conv
        net, the tail's output (e.g. ``(1, classes)``) when the model has one.

        uint8 frames go to the native runner as they are: the change gate compares their bytes, and only the
        patches it flags are converted to the model's float input (the arithmetic of :func:`preprocess`)."""
        t0 = time.perf_counter()
        raw = np.asarray(getattr(frame, "data", frame))
        if raw.dtype == np.uint8 and (raw.ndim == 2 or (raw.ndim == 3 and raw.shape[2] in (1, 3, 4))):
            shape: Tuple[int, ...] = self._model_input_shape(raw)
            self._check_shape(shape)
            c = shape[0]
            mean, std = _channel_vector(self.mean, "mean", c), _channel_vector(self.std, "std", c)
            y = self._native.run_u8(np.ascontiguousarray(raw), self.in_channels, mean, std)
        else:
            x = self.preprocess(frame)
            shape = x.shape
            self._check_shape(shape)
            y = self._native.run(x)
        self._shape = shape
        stats = dict(self._native.stats())
        t1 = time.perf_counter()
        if self.tail:
            # the tail reads only the runner's output: when no output pixel changed, neither did it
            if stats["output_changed"] or self._tail_out is None:
                self._tail_out = self._run_tail(y)
            y = self._tail_out.copy()
        stats["tail_seconds"] = time.perf_counter() - t1
        stats["core_seconds"] = stats["seconds"]
        stats["seconds"] = time.perf_counter() - t0
        self._stats = stats
        self.history.append(stats)
        return y

    def _check_shape(self, shape: Tuple[int, ...]) -> None:
        if self._shape is not None and shape != self._shape:
            raise ValueError(
                f"frame: shape changed mid-stream: expected {self._shape} (CHW, from the first frame), got {shape};"
                " call reset() to start a new stream"
            )

    @property
    def input_shape(self) -> Optional[Tuple[int, ...]]:
        """``(C, H, W)`` of the model input of the current stream (``None`` before its first frame)."""
        return self._shape

    @property
    def stats(self) -> Dict[str, Any]:
        """Last frame: ``frame``, ``dense`` (ran densely: first frame, forced or error refresh),
        ``error_refresh`` (dense because ``estimated_error`` passed ``error_bound``), ``patch_fraction``
        (input patches flagged), ``layer_fractions`` (output pixels recomputed per stage: a conv/pool with the
        pointwise layers after it), ``compute_fraction`` (recomputed work over dense work, overall),
        ``estimated_error`` (relative L2 distance between the frame and the input the caches represent),
        ``output_changed`` (some output pixel was recomputed), and the time split in seconds: ``seconds`` (whole
        call), ``core_seconds`` (native part), within it ``gate_seconds`` (change gate, reference update and, for
        uint8 frames, conversion of the flagged patches), ``bookkeeping_seconds`` (dirty regions through the
        layers) and ``recompute_seconds`` (the layers' work), then ``tail_seconds`` (the dense tail, run only
        when its input changed)."""
        return dict(self._stats)

    def reset(self) -> None:
        """Forgets the stream: the next frame runs densely and may have a new shape."""
        self._native.reset()
        self._shape = None
        self._tail_out = None
        self._stats = {}
        self.history.clear()
