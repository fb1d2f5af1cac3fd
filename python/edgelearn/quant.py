"""Symmetric INT8 quantization: ``quantize`` and ``dequantize``.

Argument normalisation lives here; the work (statistics, clipping, rounding) runs in the Rust core with
the GIL released, multi-threaded for large arrays.

For each channel (the whole array when per tensor), with ``c(x)`` the optionally clipped values::

    scale = absmax(c(x)) / 127          (float32; 1.0 if that is 0)
    q     = clip(round(c(x) / scale), -127, 127)

``round`` is round-half-to-even (``"nearest"``, identical to ``np.rint(x / scale)`` in float32) or
stochastic (``min(floor(x / scale + u), 127)``: the float32 sum can round ``127 + u`` up to 128; ``u`` in
[0, 1) from a hash of the seed and the flat element
index, so a seed gives the same codes whatever the thread count).
"""

from __future__ import annotations

import operator

import numpy as np

from . import _native

__all__ = ["quantize", "dequantize", "SIGMA_Z", "MINMAX_KAPPA"]

#: Default ``z`` of ``clip="sigma"``: the two-sided 99% interval of a normal distribution.
SIGMA_Z = 2.576
#: Default ``kappa`` of ``clip="minmax"``.
MINMAX_KAPPA = 0.95

_CLIP_DEFAULTS = {"sigma": SIGMA_Z, "minmax": MINMAX_KAPPA}
_ROUNDINGS = ("nearest", "stochastic")
_SEED_LIMIT = 1 << 64


def _float32_array(x):
    """``x`` as a C-contiguous float32 array: float32 read in place, other real floats converted."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a numpy.ndarray of a real floating dtype, got {type(x).__name__}")
    if x.dtype != np.float32:
        if x.dtype.kind != "f":
            raise TypeError(
                f"x: expected a real floating dtype (float16/32/64), got {x.dtype}; "
                "convert explicitly, e.g. x.astype(numpy.float32)"
            )
        # Values beyond float32's range become inf and are reported as non-finite by the core.
        with np.errstate(over="ignore"):
            x = x.astype(np.float32)
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    return x


def _axis(value, arg):
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{arg}: expected an int or None, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{arg}: expected an int or None, got {type(value).__name__}") from None


def _seed(seed):
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)):
        raise TypeError("seed: expected an int in [0, 2**64) or None, got bool")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed: expected an int in [0, 2**64) or None, got {type(seed).__name__}") from None
    if not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed: expected an int in [0, 2**64), got {seed}")
    return seed


def _clip(clip):
    """``None``, ``"sigma"``, ``"minmax"``, ``("sigma", z)`` or ``("minmax", kappa)`` -> ``(mode, param)``."""
    if clip is None:
        return None
    if isinstance(clip, str):
        mode, param = clip, None
    elif isinstance(clip, tuple) and len(clip) == 2 and isinstance(clip[0], str):
        mode, param = clip
    else:
        raise ValueError(
            f"clip: expected None, 'sigma', 'minmax', ('sigma', z) or ('minmax', kappa), got {clip!r}"
        )
    if mode not in _CLIP_DEFAULTS:
        raise ValueError(f"clip: unknown mode {mode!r}; expected 'sigma' or 'minmax'")
    if param is None:
        param = _CLIP_DEFAULTS[mode]
    elif isinstance(param, (bool, np.bool_)) or not isinstance(param, (int, float, np.integer, np.floating)):
        raise TypeError(f"clip: the {mode} parameter must be a real number, got {type(param).__name__}")
    # range checks (z > 0, kappa in (0, 1]) are the core's
    return mode, float(param)


def quantize(x, per_channel_axis=None, rounding="nearest", seed=None, clip=None):
    """Symmetric INT8 quantization of a real floating array.

    Args:
        x: ``numpy.ndarray`` of a real floating dtype, any shape (0-d and empty included). float32 is read
            in place; float16/float64 are converted to float32 first; non-C-contiguous arrays are copied.
            NaN/inf (also float64 values beyond float32's range) raise ``ValueError``.
        per_channel_axis: ``None`` for one scale for the whole array, or an axis (negative allowed) along
            which each index gets its own scale (and its own clipping statistics).
        rounding: ``"nearest"`` (round half to even) or ``"stochastic"`` (unbiased).
        seed: int in ``[0, 2**64)`` for stochastic rounding; the same seed gives the same codes for any
            thread count. ``None`` draws a fresh seed from OS randomness, a counter and the clock (not
            reproducible). Ignored with ``rounding="nearest"`` (still type-checked), so callers can pass a
            seed whatever the rounding mode.
        clip: range clipping before the scale is computed (Octo's PRC); clipped elements keep their
            clipped value. ``None``; ``"sigma"`` / ``("sigma", z)``: clip to ``mean ± z·σ`` (population σ,
            computed in float64; z > 0, default 2.576); ``"minmax"`` / ``("minmax", kappa)``: clip to
            ``[kappa·min, kappa·max]`` (kappa in (0, 1], default 0.95). Bounds are rounded to float32.

    Returns:
        ``(q, scale)``: ``q`` int8 of ``x``'s shape with codes in [-127, 127]; ``scale`` float32, a 0-d
        array per tensor or shape ``(x.shape[per_channel_axis],)`` per channel. ``q * scale`` (broadcast
        along the axis) approximates the clipped ``x``.
    """
    x = _float32_array(x)
    axis = _axis(per_channel_axis, "per_channel_axis")
    if not isinstance(rounding, str):
        raise TypeError(f"rounding: expected 'nearest' or 'stochastic', got {type(rounding).__name__}")
    if rounding not in _ROUNDINGS:
        raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {rounding!r}")
    seed = _seed(seed)
    return _native._quantize(x, axis, rounding, seed, _clip(clip))


def dequantize(q, scale, axis=None):
    """``q * scale`` as float32.

    Args:
        q: int8 ``numpy.ndarray`` (non-contiguous arrays are copied).
        scale: per tensor (``axis=None``): a 0-d float32 array or a Python/numpy float; per channel: a 1-D
            float32 array of length ``q.shape[axis]``. Every scale must be finite and > 0.
        axis: ``None``, or the axis of ``q`` the scales run along (negative allowed).
    """
    if not isinstance(q, np.ndarray):
        raise TypeError(f"q: expected a numpy.ndarray of dtype int8, got {type(q).__name__}")
    if q.dtype != np.int8:
        raise TypeError(f"q: expected dtype int8, got {q.dtype}")
    if not q.flags.c_contiguous:
        q = np.ascontiguousarray(q)
    axis = _axis(axis, "axis")
    if isinstance(scale, np.ndarray):
        if scale.dtype != np.float32:
            raise TypeError(f"scale: expected dtype float32, got {scale.dtype}")
        if not scale.flags.c_contiguous:
            scale = np.ascontiguousarray(scale)
    elif isinstance(scale, (float, np.floating)) and not isinstance(scale, bool):
        scale = np.asarray(scale, dtype=np.float32)
    else:
        raise TypeError(f"scale: expected a float32 numpy.ndarray or a float, got {type(scale).__name__}")
    return _native._dequantize(q, scale, axis)
