"""Differentiable layer ops and losses. Each op calls the Rust core once for its forward and once per backward.

FP32 ops: ``linear``, ``conv2d``, ``batch_norm2d``, ``relu``, ``max_pool2d``, ``avg_pool2d``,
``adaptive_avg_pool2d``. INT8 (Octo) ops: ``linear_int8``, ``conv2d_int8``, which save only the int8 input and
its scale for backward. Cheap ops done in numpy: ``compensation``, ``dropout``, bias gradients (``Σ dY``),
losses (``cross_entropy``, ``mse``).

Arrays handed to the core are float32 and C-contiguous (``_c`` makes them so only when they are not).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

import numpy as np

from . import _native
from .octo_config import OctoConfig
from .tensor import ArrayLike, Tensor, as_tensor, is_grad_enabled, make_result

__all__ = [
    "linear",
    "linear_int8",
    "conv2d",
    "conv2d_int8",
    "batch_norm2d",
    "relu",
    "relu6",
    "hardswish",
    "sigmoid",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "dropout",
    "residual_add",
    "compensation",
    "compensation_penalty",
    "compensation_penalties",
    "cross_entropy",
    "mse",
    "step_seed",
]

IntPair = Union[int, Tuple[int, int]]


def _c(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _pair(v: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name}: expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _channel_sum(g: np.ndarray) -> np.ndarray:
    """Σ over every axis but 1 of an (N, C, ...) array, float32: one core pass, in f64 per plane (numpy's
    einsum took twice as long on the CNN's gradients)."""
    return _native.channel_sums(_c(g))


def _take_donated(x: Tensor) -> bool:
    """True (once) if ``Sequential`` donated ``x``'s buffer to this op: the op may overwrite ``x.data``
    (``x`` was made ``owned`` by its op and nobody but ``Sequential`` holds it; see ``make_result``)."""
    if getattr(x, "_donated", False):
        x._donated = False
        x._range = None  # its values are about to change
        return True
    return False


def _writable_grad(g: np.ndarray, owned: bool) -> bool:
    """True if the incoming gradient may be overwritten with the outgoing one: the autograd sweep says it
    holds the only reference (``owned``, see ``make_result``), and it is a writable float32 C-contiguous
    array of its own."""
    return (owned and type(g) is np.ndarray and g.dtype == np.float32 and g.base is None
            and g.flags.c_contiguous and g.flags.writeable)


def _need(t: Optional[Tensor]) -> bool:
    return t is not None and t.requires_grad


def _records(*inputs: Optional[Tensor]) -> bool:
    """Whether an op on ``inputs`` will be recorded for backward (recording on and some input requires grad),
    as ``make_result`` decides. When not (a frozen layer whose input needs no gradient either, or ``no_grad``),
    ops keep nothing for a backward that will never run: no int8 copy of the input, no ReLU mask, no closure
    over the output; and they normalise/activate a donated input in place. That is what makes the frozen
    prefix of a ``--train last:K`` fine-tuning cost only its forward."""
    return is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)


def _unrecorded(y: np.ndarray) -> Tensor:
    """The output of an op that records nothing: a fresh array only the result holds (``owned``)."""
    out = Tensor(y)
    out._owned = True
    return out


def step_seed(base: int, layer_id: int, step: int) -> int:
    """Seed for one layer's stochastic rounding at one step (splitmix64 of the three numbers)."""
    mask = (1 << 64) - 1
    z = (base * 0x9E3779B97F4A7C15 + layer_id * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


# --- linear ------------------------------------------------------------------------------------------------


def linear(x: ArrayLike, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """FP32 ``Y = X·Wᵀ + b`` (X (N, K), W (O, K)); backward ``dX = dY·W``, ``dW = dYᵀ·X``, ``db = Σ dY``."""
    x = as_tensor(x)
    xd, wd = _c(x.data), weight.data
    if xd.ndim != 2 or xd.shape[1] != wd.shape[1]:
        raise ValueError(f"linear: input must have shape (N, {wd.shape[1]}), got {xd.shape}")
    need_x, need_w, need_b = x.requires_grad, weight.requires_grad, _need(bias)
    y = _native.matmul_f32(xd, wd.T, None if bias is None else bias.data)

    def backward(g: np.ndarray):
        g = _c(g)
        dx = _native.matmul_f32(g, wd) if need_x else None
        dw = _native.matmul_f32(g.T, xd) if need_w else None
        db = g.sum(axis=0) if need_b else None
        return dx, dw, db

    return make_result(y, (x, weight, bias), backward, "linear", owned=True)


def _quantize_weight(w: np.ndarray, cfg: OctoConfig):
    """``(Wq, s_w)`` as an INT8 layer's forward quantizes its weight (used by the video runner, which keeps
    frozen INT8 weights outside autograd)."""
    return _native._quantize(_c(w), 0 if cfg.per_channel_weights else None, cfg.weight_rounding, None, None)


Compensation = Tuple[Tensor, Tensor, Tensor]


def _octo_layer(x: Tensor, xd: np.ndarray, weight: Tensor, bias: Optional[Tensor], cfg: OctoConfig,
                stride: Optional[Tuple[int, int]], padding: Optional[Tuple[int, int]], seed: int, training: bool,
                compensation: Optional[Compensation], name: str, dilation: Optional[Tuple[int, int]] = None,
                groups: int = 1) -> Tensor:
    """The autograd wiring of an Octo INT8 layer: one core call forward (``octo_forward``: quantize X and W,
    INT8 GEMM/conv with rescale + bias + Compensation fused, int8 X and its scale kept in an opaque state)
    and one backward (``octo_backward``: PRC + quantize dY, dX and dW on INT8 kernels, bias and
    Compensation sums)."""
    comp = None if compensation is None else (compensation[0].data, compensation[1].data, compensation[2].data)
    # the range the op that wrote x took as it wrote it: X's codes without a statistics pass over X
    x_range = x._range if xd is x.data else None
    y, saved = _native.octo_forward(
        xd, weight.data, None if bias is None else bias.data, comp, stride, padding,
        cfg.act_rounding, cfg.weight_rounding, cfg.grad_rounding, cfg.prc_clip(), cfg.per_channel_weights,
        seed, training, dilation, groups, x_range,
    )
    need_x, need_w, need_b = x.requires_grad, weight.requires_grad, _need(bias)
    need_c = compensation is not None and any(t.requires_grad for t in compensation)

    def backward(g: np.ndarray, _g_owned: bool = False):
        # every gradient is a fresh array of the core call (owns_grads): the next op back may overwrite dx.
        # With dX to compute, dW comes back as a DeferredGrad computed meanwhile on another thread, which goes
        # on while the sweep does the earlier layers (see Tensor.backward); without, dW alone uses every thread
        dx, dw, db, da, dm, dbeta = _native.octo_backward(saved, _c(g), need_x, need_w, need_b, need_c, need_x)
        if compensation is None:
            return dx, dw, db
        return dx, dw, db, da, dm, dbeta

    return make_result(y, (x, weight, bias) + tuple(compensation or ()), backward, name, owned=True,
                       owns_grads=True)


def linear_int8(
    x: ArrayLike, weight: Tensor, bias: Optional[Tensor], cfg: OctoConfig, seed: int = 0, training: bool = True,
    compensation: Optional[Compensation] = None,
) -> Tensor:
    """Octo INT8 linear: ``Y = (Xq·Wqᵀ)·s_x·s_w + b`` on the INT8 GEMM; saves only ``Xq, s_x`` (and ``Wq``).

    Backward: PRC-clip then quantize dY (``cfg``), ``dW = dYqᵀ·Xq`` and ``dX = dYq·Wq`` on the INT8 GEMM,
    ``db = Σ dY`` in FP32. With per-channel weights, dX runs in FP32 on the integer codes scaled by
    ``s_dy·s_w[o]`` (a scale along the reduction axis cannot be factored out of an INT8 product).

    ``compensation=(α, μ, β)``: the LAC layer that follows (``y + α⊙μ + β``, per output feature) applied in
    the same op, its shift added to the bias of the GEMM epilogue; gradients flow to α, μ, β as well.
    """
    x = as_tensor(x)
    xd, wd = _c(x.data), weight.data
    if xd.ndim != 2 or xd.shape[1] != wd.shape[1]:
        raise ValueError(f"linear: input must have shape (N, {wd.shape[1]}), got {xd.shape}")
    return _octo_layer(x, xd, weight, bias, cfg, None, None, seed, training, compensation, "linear_int8")


# --- convolution -------------------------------------------------------------------------------------------


def _check_conv(xd: np.ndarray, wd: np.ndarray, groups: int = 1) -> None:
    if xd.ndim != 4:
        raise ValueError(f"conv2d: input must be 4-D (N, C, H, W), got shape {xd.shape}")
    if groups < 1 or xd.shape[1] % groups or wd.shape[0] % groups:
        raise ValueError(f"conv2d: groups={groups} must divide the input channels ({xd.shape[1]}) and the "
                         f"output channels ({wd.shape[0]})")
    if xd.shape[1] != wd.shape[1] * groups:
        raise ValueError(f"conv2d: input has {xd.shape[1]} channels, the weight expects {wd.shape[1] * groups}"
                         + (f" ({wd.shape[1]} per group x {groups} groups)" if groups > 1 else ""))


def conv2d(
    x: ArrayLike, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
    dilation: IntPair = 1, groups: int = 1,
) -> Tensor:
    """FP32 2-D convolution (NCHW) with fused bias; backward in one core call. ``groups > 1`` (grouped and
    depthwise convolution, weight ``(O, C/groups, kh, kw)``) and ``dilation > 1`` run on the core's direct
    grouped kernels; ``groups == 1`` on im2col/implicit GEMM."""
    x = as_tensor(x)
    xd, wd = _c(x.data), weight.data
    groups = int(groups)
    _check_conv(xd, wd, groups)
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    need_x, need_w, need_b = x.requires_grad, weight.requires_grad, _need(bias)
    b = None if bias is None else bias.data
    if groups > 1 or dilation != (1, 1):
        y = _native.conv2d_grouped_f32_forward(xd, wd, b, stride, padding, dilation, groups)

        def backward(g: np.ndarray):
            dx, dw, db = _native.conv2d_grouped_f32_backward(
                xd, wd, _c(g), stride, padding, dilation, groups, need_dx=need_x)
            return dx, (dw if need_w else None), (db if need_b else None)

        return make_result(y, (x, weight, bias), backward, "conv2d")
    y = _native.conv2d_f32_forward(xd, wd, b, stride, padding)

    def backward(g: np.ndarray):
        dx, dw, db = _native.conv2d_f32_backward(xd, wd, _c(g), stride, padding, need_dx=need_x)
        return dx, (dw if need_w else None), (db if need_b else None)

    return make_result(y, (x, weight, bias), backward, "conv2d", owned=True)


def conv2d_int8(
    x: ArrayLike,
    weight: Tensor,
    bias: Optional[Tensor],
    cfg: OctoConfig,
    stride: IntPair = 1,
    padding: IntPair = 0,
    seed: int = 0,
    training: bool = True,
    compensation: Optional[Compensation] = None,
    dilation: IntPair = 1,
    groups: int = 1,
) -> Tensor:
    """Octo INT8 convolution: quantized X and W, INT8 implicit GEMM with fused rescale + bias; saves ``Xq, s_x``.

    Backward: PRC-clip and quantize dY, then dX and dW on INT8 kernels, ``db = Σ dY`` in FP32 (one core call).
    ``compensation=(α, μ, β)``: a per-channel LAC layer applied in the same op, as in ``linear_int8``.
    ``groups > 1`` / ``dilation > 1``: the core's direct grouped/depthwise INT8 kernels (exact INT32 sums).
    """
    x = as_tensor(x)
    xd, wd = _c(x.data), weight.data
    groups = int(groups)
    _check_conv(xd, wd, groups)
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    return _octo_layer(x, xd, weight, bias, cfg, stride, padding, seed, training, compensation, "conv2d_int8",
                       dilation, groups)


# --- normalisation, activation, pooling --------------------------------------------------------------------


def batch_norm2d(
    x: ArrayLike,
    weight: Tensor,
    bias: Tensor,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    save_int8: bool = False,
) -> Tensor:
    """Batch normalisation over (N, H, W) per channel; updates the running statistics in place when training.

    ``save_int8`` keeps the input for backward as int8 (nearest rounding, per-tensor scale) instead of FP32;
    the core's backward reads the int8 codes directly: the INT8-training memory saving extended to
    normalisation layers.
    """
    x = as_tensor(x)
    xd = _c(x.data)
    if xd.ndim != 4 or xd.shape[1] != weight.shape[0]:
        raise ValueError(f"batch_norm2d: input must have shape (N, {weight.shape[0]}, H, W), got {xd.shape}")
    gamma = weight.data
    need_g, need_b = weight.requires_grad, bias.requires_grad
    if not _records(x, weight, bias):
        # a frozen BatchNorm on an input that needs no gradient (batch statistics in training mode, else the
        # running ones: eval mode or frozen statistics), or no_grad: nothing saved, a donated input overwritten
        if _take_donated(x) and xd is x.data:
            _native.batchnorm2d_forward(xd, gamma, bias.data, running_mean, running_var, bool(training),
                                        float(momentum), float(eps), out=xd)
            return _unrecorded(xd)
        return _unrecorded(_native.batchnorm2d_forward(
            xd, gamma, bias.data, running_mean, running_var, bool(training), float(momentum), float(eps))[0])
    if save_int8 and training:
        if _take_donated(x) and xd is x.data:
            # x is an intermediate nobody else holds: normalise in place (no second FP32 activation), and
            # take its int8 codes in the same call (the statistics pass also finds the range)
            mean, invstd, xq, sx, y_range = _native.batchnorm2d_forward_save_i8_(
                xd, gamma, bias.data, running_mean, running_var, float(momentum), float(eps)
            )
            y = xd
        else:
            xq, sx = _native._quantize(xd, None, "nearest", None, None)
            y, mean, invstd = _native.batchnorm2d_forward(
                xd, gamma, bias.data, running_mean, running_var, True, float(momentum), float(eps)
            )
            y_range = None
        sx = float(sx)
        del xd

        def backward(g: np.ndarray, g_owned: bool = False):
            # the core reads the int8 codes directly (x = xq·sx, as dequantize gives it): no FP32 copy;
            # an incoming gradient the sweep owns is overwritten with dx
            if _writable_grad(g, g_owned):
                dx, dgamma, dbeta = _native.batchnorm2d_backward_i8(g, xq, sx, gamma, mean, invstd, out=g)
            else:
                dx, dgamma, dbeta = _native.batchnorm2d_backward_i8(_c(g), xq, sx, gamma, mean, invstd)
            return dx, (dgamma if need_g else None), (dbeta if need_b else None)

        out = make_result(y, (x, weight, bias), backward, "batch_norm2d", owned=True, owns_grads=True)
        out._range = y_range  # taken as y was written: the next INT8 layer's X range (a linear bottleneck)
        return out

    y, mean, invstd = _native.batchnorm2d_forward(
        xd, gamma, bias.data, running_mean, running_var, bool(training), float(momentum), float(eps)
    )
    if training:

        def backward(g: np.ndarray):
            dx, dgamma, dbeta = _native.batchnorm2d_backward(_c(g), xd, gamma, mean, invstd)
            return dx, (dgamma if need_g else None), (dbeta if need_b else None)

    else:
        # Eval mode normalises with fixed statistics, so the op is affine per channel.
        mean_e, invstd_e = np.asarray(mean, np.float32), np.asarray(invstd, np.float32)

        def backward(g: np.ndarray):
            shape = (1, -1, 1, 1)
            xhat = (xd - mean_e.reshape(shape)) * invstd_e.reshape(shape)
            dx = g * (gamma * invstd_e).reshape(shape)
            return dx, (g * xhat).sum(axis=(0, 2, 3)), g.sum(axis=(0, 2, 3))

    return make_result(y, (x, weight, bias), backward, "batch_norm2d", owned=True)


def batch_norm2d_relu(
    x: Tensor, weight: Tensor, bias: Tensor, running_mean: np.ndarray, running_var: np.ndarray,
    momentum: float, eps: float, pool: bool, relu6: bool = False,
) -> Optional[Tensor]:
    """Training-mode ``batch_norm2d(save_int8=True)`` then ``relu(save_mask=True)`` (``relu6``:
    ``relu6(save_mask=True)``, never with ``pool``) (then, ``pool``,
    ``max_pool2d(2)``) as one core call each way, with the same results (finite input) and the same saved
    state: the input's int8 codes, and ReLU's bit mask or the pooling argmax (a window whose maximum is not
    positive passes no gradient). Only on a donated input (``Sequential``), which is overwritten; returns None
    when that does not hold or nothing is recorded (the caller then runs the ops one by one)."""
    xd = x.data
    if not (_records(x, weight, bias) and xd.ndim == 4 and _take_donated(x)):
        return None
    if xd is not _c(xd) or (pool and (xd.shape[2] < 2 or xd.shape[3] < 2)):
        x._donated = True  # not taken: leave it to the unfused ops
        return None
    gamma = weight.data
    need_g, need_b = weight.requires_grad, bias.requires_grad
    mean, invstd, xq, sx, saved, y, y_range = _native.batchnorm2d_relu_forward_save_i8_(
        xd, gamma, bias.data, running_mean, running_var, float(momentum), float(eps), bool(pool), bool(relu6))
    sx = float(sx)
    del xd

    def backward(g: np.ndarray, g_owned: bool = False):
        if not pool and not _writable_grad(g, g_owned):
            g = g.copy()  # the mask form works in place
        dx, dgamma, dbeta = _native.batchnorm2d_relu_backward_i8_(
            _c(g), saved, bool(pool), xq, sx, gamma, mean, invstd)
        return dx, (dgamma if need_g else None), (dbeta if need_b else None)

    name = "batch_norm2d_relu_maxpool" if pool else ("batch_norm2d_relu6" if relu6 else "batch_norm2d_relu")
    out = make_result(y, (x, weight, bias), backward, name, owned=True, owns_grads=True)
    out._range = y_range  # taken as y was written: the next INT8 layer's X range
    return out


def relu(x: ArrayLike, save_mask: bool = False) -> Tensor:
    """``max(x, 0)``. Backward needs only where the output is positive: ``save_mask`` keeps that as a bit mask
    (packed, 1/32 of the FP32 output), made in the same core call as the output; in that mode a donated input
    (see ``Sequential``) is overwritten with the output and an unshared incoming gradient with ``dx``."""
    x = as_tensor(x)
    if not _records(x):
        xd = _c(x.data)
        if _take_donated(x) and xd is x.data:
            np.maximum(xd, np.float32(0), out=xd)  # in place: x is an intermediate nobody else holds
            return _unrecorded(xd)
        return _unrecorded(_native.relu_forward(xd))
    if not save_mask:
        y = _native.relu_forward(_c(x.data))
        return make_result(y, (x,), lambda g: (_native.relu_backward(_c(g), y),), "relu")
    return _with_mask(x, _c(x.data), _native.relu_forward_mask, "relu")


def relu6(x: ArrayLike, save_mask: bool = False) -> Tensor:
    """``min(max(x, 0), 6)``. Backward passes ``dy`` where ``0 < x < 6``: ``save_mask`` keeps that as a packed
    bit mask (1/32 of the FP32 output; the INT8 saved-activation mode), else the FP32 output is kept. With
    ``save_mask`` a donated input (see ``Sequential``) is overwritten with the output."""
    x = as_tensor(x)
    xd = _c(x.data)
    recording = _records(x)
    if save_mask and recording:
        return _with_mask(x, xd, _native.relu6_forward_mask, "relu6")
    if not recording and _take_donated(x) and xd is x.data:
        # in place (x is an intermediate nobody else holds); np.clip is several times slower than this
        y = np.minimum(np.maximum(xd, np.float32(0), out=xd), np.float32(6), out=xd)
    else:
        y = _native.relu6_forward(xd)
    del xd
    if not recording:
        return _unrecorded(y)
    return make_result(y, (x,), lambda g: (_native.relu6_backward(_c(g), y),), "relu6")


def _with_mask(x: Tensor, xd: np.ndarray, forward_mask: Callable, name: str) -> Tensor:
    """ReLU or ReLU6 (``forward_mask``: ``_native.relu_forward_mask`` / ``relu6_forward_mask``) while recording,
    saving the packed bit mask: output and mask in one core call, written over a donated input."""
    if _take_donated(x) and xd is x.data:
        y, mask, y_range = forward_mask(xd, out=xd)  # in place: x is an intermediate nobody else holds
    else:
        y, mask, y_range = forward_mask(xd)
    del xd

    def backward(g: np.ndarray, g_owned: bool = False):
        if _writable_grad(g, g_owned):
            return (_native.relu_backward_mask(g, mask, out=g),)
        return (_native.relu_backward_mask(_c(g), mask),)

    out = make_result(y, (x,), backward, name, owned=True, owns_grads=True)
    out._range = y_range  # taken as y was written: the next INT8 layer's X range
    return out


def hardswish(x: ArrayLike) -> Tensor:
    """``x·relu6(x + 3)/6`` (MobileNetV3's activation); backward ``dy·(0 | (2x + 3)/6 | 1)`` below -3, between,
    above 3."""
    x = as_tensor(x)
    xd = _c(x.data)
    y = xd * np.clip(xd + np.float32(3), 0, 6) / np.float32(6)

    def backward(g: np.ndarray):
        d = np.where(xd < -3, np.float32(0), np.where(xd > 3, np.float32(1), (2 * xd + 3) / np.float32(6)))
        return (g * d.astype(np.float32, copy=False),)

    return make_result(y.astype(np.float32, copy=False), (x,), backward, "hardswish")


def sigmoid(x: ArrayLike) -> Tensor:
    """``1/(1 + e^-x)``, computed without overflow; backward ``dy·y·(1 - y)`` from the saved output."""
    x = as_tensor(x)
    xd = _c(x.data)
    e = np.exp(-np.abs(xd))
    y = np.where(xd >= 0, 1 / (1 + e), e / (1 + e)).astype(np.float32, copy=False)
    return make_result(y, (x,), lambda g: (g * y * (1 - y),), "sigmoid")


def max_pool2d(x: ArrayLike, kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0) -> Tensor:
    """Max pooling; saves only the uint8 argmax index of each window for backward."""
    x = as_tensor(x)
    k = _pair(kernel_size, "kernel_size")
    s = k if stride is None else _pair(stride, "stride")
    p = _pair(padding, "padding")
    shape = x.shape
    y, idx = _native.maxpool2d_forward(_c(x.data), k, s, p)
    return make_result(
        y, (x,), lambda g, _owned: (_native.maxpool2d_backward(_c(g), idx, shape, k, s, p),), "max_pool2d",
        owned=True, owns_grads=True,
    )


def avg_pool2d(x: ArrayLike, kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0) -> Tensor:
    x = as_tensor(x)
    k = _pair(kernel_size, "kernel_size")
    s = k if stride is None else _pair(stride, "stride")
    p = _pair(padding, "padding")
    shape = x.shape
    y = _native.avgpool2d_forward(_c(x.data), k, s, p)
    return make_result(y, (x,), lambda g, _owned: (_native.avgpool2d_backward(_c(g), shape, k, s, p),), "avg_pool2d",
                       owned=True, owns_grads=True)


def adaptive_avg_pool2d(x: ArrayLike, output_size: IntPair = 1) -> Tensor:
    """Average pooling to ``output_size``; the input size must be a multiple of it (1 always works)."""
    x = as_tensor(x)
    if x.ndim != 4:
        raise ValueError(f"adaptive_avg_pool2d: input must be 4-D (N, C, H, W), got shape {x.shape}")
    oh, ow = _pair(output_size, "output_size")
    h, w = x.shape[2], x.shape[3]
    if oh <= 0 or ow <= 0 or h % oh or w % ow:
        raise ValueError(f"adaptive_avg_pool2d: input size {(h, w)} is not a multiple of output size {(oh, ow)}")
    k = (h // oh, w // ow)
    return avg_pool2d(x, k, k, 0)


def dropout(x: ArrayLike, p: float, training: bool, rng: np.random.Generator) -> Tensor:
    """Inverted dropout: zero each element with probability ``p``, scale the rest by 1/(1-p); identity in eval."""
    x = as_tensor(x)
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return make_result(np.zeros_like(x.data), (x,), lambda g: (np.zeros_like(g),), "dropout")
    scale = np.float32(1.0 / (1.0 - p))
    keep = (rng.random(x.shape, dtype=np.float32) >= p).astype(np.float32)
    keep *= scale
    return make_result(x.data * keep, (x,), lambda g: (g * keep,), "dropout")


def residual_add(out: Tensor, identity: ArrayLike) -> Tensor:
    """``out + identity`` of a residual block. ``out`` is the block's main path, which only the block holds:
    when its op said its storage is its alone (``owned``, see ``make_result``) and shape and dtype agree, the
    sum is written over it (no third activation-sized buffer next to ``out`` and ``identity``). Saves
    nothing for backward (``d out = d identity = dy``)."""
    identity = as_tensor(identity)
    od, idd = out.data, identity.data
    if not (type(out) is Tensor and out._owned and od.shape == idd.shape and od.dtype == idd.dtype
            and od.flags.writeable and od is not idd):
        return out + identity
    out._owned = False  # its storage now belongs to the sum
    out._range = None  # and its values change
    if (od.dtype == np.float32 and od.flags.c_contiguous and idd.flags.c_contiguous
            and not np.may_share_memory(od, idd)):
        # the core's add, which takes the sum's range as it writes it (the next INT8 layer's X range)
        y_range = _native.residual_add_(od, idd)
    else:
        np.add(od, idd, out=od)
        y_range = None
    res = make_result(od, (out, identity), lambda g: (g, g), "add", owned=True)
    res._range = y_range
    return res


def compensation(x: ArrayLike, alpha: Tensor, mu: Tensor, beta: Tensor) -> Tensor:
    """LAC: ``y = x + α⊙μ + β`` with parameters shaped per channel (C,) or like one sample (C, H, W).

    (C,) parameters broadcast over (N, C) and (N, C, H, W). ``dx = dy``; ``dα = Σ dy·μ``, ``dμ = Σ dy·α``,
    ``dβ = Σ dy`` summed over the broadcast axes.
    """
    x = as_tensor(x)
    pshape = alpha.shape
    if x.ndim < 2 or x.shape[1] != pshape[0] or (len(pshape) > 1 and x.shape[1:] != pshape):
        raise ValueError(f"compensation: input shape {x.shape} does not fit parameters of shape {pshape}")
    per_channel = len(pshape) == 1
    view = (pshape[0],) + (1,) * (x.ndim - 2) if per_channel else pshape
    a, m, b = alpha.data, mu.data, beta.data
    shift = (a * m + b).reshape(view)
    xd = x.data
    donated = _take_donated(x) and shift.dtype == xd.dtype
    if donated:
        y = np.add(xd, shift, out=xd)  # in place: x is an intermediate nobody else holds
    else:
        y = xd + shift

    def backward(g: np.ndarray, _owned: bool = False):
        s = _channel_sum(g) if per_channel else g.sum(axis=0)
        return g, s * m, s * a, s

    y = y.astype(np.float32, copy=False)
    return make_result(y, (x, alpha, mu, beta), backward, "compensation", owned=True,
                       owns_grads=True)


def compensation_penalty(mu: Tensor, beta: Tensor, lam: float) -> Tensor:
    """LAC's regulariser ``0.5·λ·(‖μ‖² + ‖β‖²)`` as one recorded op."""
    m, b = mu.data, beta.data
    value = np.asarray(0.5 * lam * (float(np.dot(m.ravel(), m.ravel())) + float(np.dot(b.ravel(), b.ravel()))), np.float32)
    return make_result(value, (mu, beta), lambda g: (g * lam * m, g * lam * b), "compensation_penalty")


def compensation_penalties(terms) -> Tensor:
    """``Σ 0.5·λᵢ·(‖μᵢ‖² + ‖βᵢ‖²)`` over ``terms = [(μ, β, λ), ...]`` as one recorded op (what
    ``Module.regularization`` uses for a model's LAC layers: one autograd node instead of one per layer
    plus the additions)."""
    arrays = [(mu.data, beta.data, float(lam)) for mu, beta, lam in terms]
    total = 0.0
    for m, b, lam in arrays:
        mv, bv = m.reshape(-1), b.reshape(-1)
        total += 0.5 * lam * (float(mv @ mv) + float(bv @ bv))
    value = np.asarray(total, np.float32)

    def backward(g, _owned: bool = False):
        grads = []
        for m, b, lam in arrays:
            c = np.float32(float(g) * lam)  # one multiply per array
            grads += [c * m, c * b]
        return tuple(grads)

    parents = tuple(t for mu, beta, _ in terms for t in (mu, beta))
    # owns_grads: every gradient is a fresh product, so a leaf takes it as its .grad without a copy
    return make_result(value, parents, backward, "compensation_penalties", owns_grads=True)


# --- losses ------------------------------------------------------------------------------------------------


def cross_entropy(
    logits: ArrayLike, target: ArrayLike, label_smoothing: float = 0.0, reduction: str = "mean"
) -> Tensor:
    """Softmax cross-entropy of ``logits`` (N, C) against class indices ``target`` (N,), PyTorch semantics.

    With label smoothing ε the target distribution is ``(1-ε)·onehot + ε/C``. ``reduction``: 'mean' | 'sum'.
    """
    logits = as_tensor(logits)
    t = np.asarray(target.data if isinstance(target, Tensor) else target)
    z = logits.data
    if z.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be 2-D (N, C), got shape {z.shape}")
    n, c = z.shape
    if t.shape != (n,) or t.dtype.kind not in "iu":  # np.integer (bool is not), without issubdtype
        raise ValueError(f"cross_entropy: target must be integer class indices of shape ({n},), got {t.dtype} {t.shape}")
    if n and (t.min() < 0 or t.max() >= c):
        raise ValueError(f"cross_entropy: target values must lie in [0, {c}), got [{t.min()}, {t.max()}]")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    shifted = z - z.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    logp = shifted - logsumexp
    rows = np.arange(n)
    denom = float(n) if reduction == "mean" else 1.0
    if label_smoothing == 0.0:
        # one-hot targets: the same values as the smoothed form below without its (N, C) target array
        loss = np.asarray(-logp[rows, t].sum() / max(denom, 1.0), dtype=z.dtype)

        def backward(g: np.ndarray):
            p = np.exp(logp)
            p[rows, t] -= 1.0
            return (p * (g / max(denom, 1.0))).astype(z.dtype, copy=False), None

        return make_result(loss, (logits, None), backward, "cross_entropy")
    q = np.full_like(logp, label_smoothing / c)
    q[rows, t] += 1.0 - label_smoothing
    per_sample = -(q * logp).sum(axis=1)
    loss = np.asarray(per_sample.sum() / max(denom, 1.0), dtype=z.dtype)

    def backward(g: np.ndarray):
        return ((np.exp(logp) - q) * (g / max(denom, 1.0))).astype(z.dtype, copy=False), None

    return make_result(loss, (logits, None), backward, "cross_entropy")


def mse(pred: ArrayLike, target: ArrayLike, reduction: str = "mean") -> Tensor:
    """Mean (or summed) squared error; gradients flow to both arguments if they require them."""
    pred = as_tensor(pred)
    target = as_tensor(target, dtype=pred.dtype)
    if pred.shape != target.shape:
        raise ValueError(f"mse: shapes differ: {pred.shape} vs {target.shape}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    diff = pred - target
    sq = diff * diff
    return sq.mean() if reduction == "mean" else sq.sum()
