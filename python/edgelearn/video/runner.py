"""Patch-skip inference of a ``Sequential`` conv net over a stream of video frames.

The model is translated once into the native runner (``edgelearn._native.PatchSkip``): conv layers keep
their weights and bias, eval-mode ``BatchNorm2d`` becomes a per-channel affine, ``ReLU``, ``MaxPool2d`` and
``AvgPool2d`` map one to one. Per frame the runner flags input patches whose largest change since the
cached reference exceeds ``threshold``, dilates them through each layer's receptive field and recomputes
only those output tiles. With ``threshold=0`` the output equals ``model(edgelearn.tensor(frame[None]))``
up to float32 rounding.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from .. import _native
from ..functional import _pair
from ..nn import AvgPool2d, BatchNorm2d, Conv2d, Identity, MaxPool2d, Module, ReLU, Sequential


class UnsupportedLayerError(TypeError):
    """The model contains a layer the patch-skip runner cannot run (it names the layer)."""


def _flatten(model: Module) -> List[Module]:
    if isinstance(model, Sequential):
        out: List[Module] = []
        for m in model._modules.values() if hasattr(model, "_modules") else model:
            out.extend(_flatten(m))
        return out
    return [model]


def _arr(x: Any) -> np.ndarray:
    data = getattr(x, "data", x)
    return np.ascontiguousarray(np.asarray(data, dtype=np.float32))


class PatchSkipRunner:
    """Runs ``model`` over frames, skipping unchanged regions.

    Args:
        model: a ``Sequential`` (possibly nested) of ``Conv2d`` (FP32 mode), ``BatchNorm2d`` (its running
            statistics are used, as in eval mode), ``ReLU``, ``MaxPool2d``, ``AvgPool2d`` and ``Identity``.
        patch: side of the gate's input patches in pixels.
        threshold: a patch is recomputed when its max |change| over all channels (in the model's input
            units, e.g. [0, 1] for uint8 frames) since the cached reference exceeds this; 0 = any change.
        refresh_every: run densely every this many frames (0: only the first frame after a reset).
        tile: side of the output tiles recomputed per layer.

    The layers' parameters are copied at construction; build a new runner after changing the model.
    """

    def __init__(self, model: Module, patch: int = 16, threshold: float = 0.0, refresh_every: int = 0, tile: int = 8):
        if int(patch) < 1:
            raise ValueError(f"patch: must be >= 1, got {patch}")
        if not float(threshold) >= 0.0:
            raise ValueError(f"threshold: must be >= 0, got {threshold}")
        if int(refresh_every) < 0:
            raise ValueError(f"refresh_every: must be >= 0 (0 = never), got {refresh_every}")
        if int(tile) < 1:
            raise ValueError(f"tile: must be >= 1, got {tile}")
        self.patch, self.threshold, self.refresh_every, self.tile = int(patch), float(threshold), int(refresh_every), int(tile)
        self._native = _native.PatchSkip(self.patch, self.threshold, self.refresh_every, self.tile)
        layers = _flatten(model)
        count = 0
        for i, m in enumerate(layers):
            name = f"layer {i} ({type(m).__name__})"
            if isinstance(m, Conv2d):
                if getattr(m, "int8", None) is not None:
                    raise UnsupportedLayerError(f"{name}: INT8 (octo) convolutions are not supported yet; use the FP32 model")
                bias = None if m.bias is None else _arr(m.bias)
                self._native.add_conv(_arr(m.weight), bias, tuple(m.stride), tuple(m.padding))
            elif isinstance(m, BatchNorm2d):
                self._native.add_batchnorm(
                    _arr(m.weight), _arr(m.bias), _arr(m.running_mean), _arr(m.running_var), float(m.eps)
                )
            elif isinstance(m, ReLU):
                self._native.add_relu()
            elif isinstance(m, (MaxPool2d, AvgPool2d)):
                k = _pair(m.kernel_size, "kernel_size")
                s = k if m.stride is None else _pair(m.stride, "stride")
                p = _pair(m.padding, "padding")
                if isinstance(m, AvgPool2d):
                    self._native.add_avgpool(k, s, p)
                else:
                    self._native.add_maxpool(k, s, p)
            elif isinstance(m, Identity):
                continue
            else:
                raise UnsupportedLayerError(
                    f"{name}: unsupported layer {type(m).__name__}; PatchSkipRunner supports Conv2d, BatchNorm2d, "
                    "ReLU, MaxPool2d, AvgPool2d and Identity in a Sequential"
                )
            count += 1
        if count == 0:
            raise ValueError("model: has no layers the runner can run")
        self._shape: Optional[tuple] = None
        self.history: List[Dict[str, Any]] = []

    def _to_chw(self, frame: Any) -> np.ndarray:
        x = np.asarray(getattr(frame, "data", frame))
        if x.dtype == np.uint8:
            if x.ndim != 3:
                raise ValueError(f"frame: a uint8 frame must be (H, W, C), got shape {x.shape}")
            return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
        if x.dtype != np.float32:
            raise TypeError(f"frame: expected float32 (C, H, W) or uint8 (H, W, C), got dtype {x.dtype}")
        if x.ndim != 3:
            raise ValueError(f"frame: a float32 frame must be (C, H, W), got shape {x.shape}")
        return np.ascontiguousarray(x)

    def __call__(self, frame: Any) -> np.ndarray:
        """Output for ``frame`` (float32 ``(C, H, W)`` or uint8 ``(H, W, C)``), shape ``(1, C', H', W')``."""
        x = self._to_chw(frame)
        if self._shape is not None and x.shape != self._shape:
            raise ValueError(
                f"frame: shape changed mid-stream: expected {self._shape} (CHW, from the first frame), got {x.shape};"
                " call reset() to start a new stream"
            )
        y = self._native.run(x)
        self._shape = x.shape
        self.history.append(self.stats)
        return y

    @property
    def stats(self) -> Dict[str, Any]:
        """Last frame: ``frame``, ``dense``, ``patch_fraction`` (input patches flagged), ``layer_fractions``
        (output tiles recomputed per stage: a conv/pool with the pointwise layers after it),
        ``compute_fraction`` (recomputed work over dense work, overall) and ``seconds``."""
        return dict(self._native.stats())

    def reset(self) -> None:
        """Forgets the stream: the next frame runs densely and may have a new shape."""
        self._native.reset()
        self._shape = None
        self.history = []
