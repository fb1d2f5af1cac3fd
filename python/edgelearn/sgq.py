"""SGQ (stripe-wise group quantization): compress feature / gradient tensors for split learning.

``encode(x, ...) -> bytes`` and ``decode(frame) -> numpy.ndarray``; ``Codec`` keeps settings and the
channel order across frames; ``frame_info(frame)`` reads a header; ``FrameError`` (a ``ValueError``) is
raised for any malformed frame. The codec itself (statistics, channel order, binary16 ranges, b-bit
packing, the versioned CRC-checked wire format) is the Rust core's ``sgq`` module, run with the GIL
released and multi-threaded for large tensors; its docs describe the frame byte by byte.

Shapes: ``x`` is float32 ``(N, C, H, W)`` (features of a conv layer), ``(N, C, L)`` (encoded as
``N×C×L×1``: stripes cut along ``L``) or ``(N, C)`` (encoded as ``N×C×1×1``: one range per group of
channels per sample). ``decode`` returns the shape that was encoded.

Modes: ``"sgq"`` (channels re-ordered by similarity, groups of ``group`` channels, stripes of
``stripe_rows`` rows, one range per (sample, group, stripe)), and the baselines ``"uniform"`` (one
range for the whole tensor at ``bits`` bits) and ``"fp16"`` (raw float16 values, ``bits`` ignored).

Error bound: with ``lo``/``hi`` the float16 range of an element's block (rounded outwards from the block's
min and max), ``|decode(encode(x)) - x| <= (hi - lo) / (2**bits - 1) / 2`` for nearest rounding and
``< (hi - lo) / (2**bits - 1)`` for stochastic (unbiased) rounding, up to float32 rounding.
"""

from __future__ import annotations

import operator

import numpy as np

from . import _native
from ._native import FrameError

__all__ = ["encode", "decode", "frame_info", "channel_order", "Codec", "FrameError", "MODES", "HEADER_BYTES"]

#: Encodings a frame can use.
MODES = ("sgq", "uniform", "fp16")
#: Size of the fixed frame header in bytes.
HEADER_BYTES = 56
_ROUNDINGS = ("nearest", "stochastic")
_SEED_LIMIT = 1 << 64


def _float32_array(x):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a numpy.ndarray of a real floating dtype, got {type(x).__name__}")
    if x.dtype != np.float32:
        if x.dtype.kind != "f":
            raise TypeError(
                f"x: expected a real floating dtype (float16/32/64), got {x.dtype}; "
                "convert explicitly, e.g. x.astype(numpy.float32)"
            )
        with np.errstate(over="ignore"):
            x = x.astype(np.float32)
    if x.ndim not in (2, 3, 4):
        raise ValueError(f"x: expected 2 (N,C), 3 (N,C,L) or 4 (N,C,H,W) dimensions, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"x: shape {x.shape} has no elements; a frame holds at least one")
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    return x


def _int(value, arg, lo, hi=None, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{arg}: expected an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{arg}: expected an int, got {type(value).__name__}") from None
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{arg}: expected an int {rng}, got {value}")
    return value


def _choice(value, arg, choices):
    if not isinstance(value, str):
        raise TypeError(f"{arg}: expected one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{arg}: expected one of {choices}, got {value!r}")
    return value


def _frame_bytes(frame):
    if isinstance(frame, bytes):
        return frame
    if isinstance(frame, (bytearray, memoryview)):
        return bytes(frame)
    raise TypeError(f"frame: expected bytes, bytearray or memoryview, got {type(frame).__name__}")


def _order(order, channels):
    arr = np.asarray(order)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(f"order: expected a 1-D sequence of ints, got {arr.dtype} with shape {arr.shape}")
    if len(arr) != channels or not np.array_equal(np.sort(arr), np.arange(channels)):
        raise ValueError(f"order: expected a permutation of 0..{channels - 1}, got {arr.tolist()[:16]}...")
    return [int(v) for v in arr]


def encode(x, bits=4, group=4, stripe_rows=None, rounding="nearest", seed=None, mode="sgq", order=None):
    """Encodes a float32 feature or gradient tensor into an SGQ frame.

    Args:
        x: ``numpy.ndarray`` ``(N, C, H, W)``, ``(N, C, L)`` or ``(N, C)`` of a real floating dtype
            (float32 is read in place; other floats are converted; non-contiguous arrays copied). Values
            must be finite with ``|x| <= 65504`` (the float16 range of the ranges on the wire).
        bits: code width, 1..8 (ignored by ``mode="fp16"``).
        group: channels per group (clamped to C).
        stripe_rows: rows per stripe (clamped to H); ``None`` means ``max(H // 4, 1)``.
        rounding: ``"nearest"`` (features) or ``"stochastic"`` (gradients; unbiased).
        seed: int in ``[0, 2**64)`` for stochastic rounding (same seed, same frame, any thread count);
            ``None`` draws a fresh one. Ignored with nearest rounding.
        mode: ``"sgq"``, or the baselines ``"uniform"`` (per-tensor range) and ``"fp16"`` (raw float16).
        order: channel order for ``mode="sgq"`` (a permutation of ``range(C)``, entry ``p`` = the channel
            placed at position ``p``); ``None`` computes it from ``x``. See :class:`Codec`.

    Returns:
        ``bytes``: the frame (56-byte header, permutation if not the identity, ranges, packed codes).
    """
    x = _float32_array(x)
    bits = _int(bits, "bits", 1, 8)
    group = _int(group, "group", 1)
    stripe_rows = _int(stripe_rows, "stripe_rows", 1, allow_none=True) or 0
    rounding = _choice(rounding, "rounding", _ROUNDINGS)
    seed = _int(seed, "seed", 0, _SEED_LIMIT - 1, allow_none=True)
    mode = _choice(mode, "mode", MODES)
    if order is not None:
        if mode != "sgq":
            raise ValueError(f"order: a channel order only applies to mode 'sgq', not {mode!r}")
        order = _order(order, x.shape[1])
    return _native._sgq_encode(x, mode, bits, group, stripe_rows, rounding, seed, order)


def decode(frame):
    """Decodes an SGQ frame into a new float32 array of the shape that was encoded.

    Raises:
        FrameError: the bytes are not a valid frame (bad magic, unknown version, truncated, trailing
            bytes, wrong CRC, lengths that disagree with the header, absurd shapes, invalid permutation
            or ranges). Nothing sized by the header is allocated before the frame is validated.
    """
    return _native._sgq_decode(_frame_bytes(frame))


def frame_info(frame):
    """Validates a frame (CRC included) and returns its header: ``version``, ``dtype``, ``mode``,
    ``bits``, ``rounding``, ``permutation`` (present?), ``shape`` (as encoded), ``shape_4d``, ``group``,
    ``stripe_rows``, ``permutation_bytes``, ``ranges_bytes``, ``codes_bytes``, ``header_bytes``,
    ``frame_bytes``, ``crc32``. Raises :class:`FrameError` like :func:`decode`."""
    return _native._sgq_frame_info(_frame_bytes(frame))


def channel_order(x):
    """The channel order SGQ computes for ``x`` (channels sorted by range width, then midpoint)."""
    return _native._sgq_channel_order(_float32_array(x))


class Codec:
    """An SGQ encoder/decoder that keeps its settings and the channel order across frames.

    The order is computed from the first tensor encoded, then recomputed every ``refresh_every`` frames
    (``None``: only when :meth:`update_order` is called). Frames are self-contained (the order travels
    in each frame whose order is not the identity), so any frame decodes on its own, with this class or
    :func:`decode`. With stochastic rounding and a ``seed``, frame ``i`` uses seed ``seed + i`` so
    successive frames draw independent noise, reproducibly.
    """

    def __init__(self, bits=4, group=4, stripe_rows=None, rounding="nearest", seed=None, mode="sgq",
                 refresh_every=None):
        self.bits = _int(bits, "bits", 1, 8)
        self.group = _int(group, "group", 1)
        self.stripe_rows = _int(stripe_rows, "stripe_rows", 1, allow_none=True)
        self.rounding = _choice(rounding, "rounding", _ROUNDINGS)
        self.seed = _int(seed, "seed", 0, _SEED_LIMIT - 1, allow_none=True)
        self.mode = _choice(mode, "mode", MODES)
        self.refresh_every = _int(refresh_every, "refresh_every", 1, allow_none=True)
        self.order = None
        self.frames = 0

    def update_order(self, x):
        """Recomputes the channel order from ``x`` and keeps it for the next frames."""
        self.order = channel_order(x)
        return self.order

    def encode(self, x):
        x = _float32_array(x)
        order = None
        if self.mode == "sgq":
            stale = self.order is None or len(self.order) != x.shape[1]
            due = self.refresh_every is not None and self.frames % self.refresh_every == 0
            if stale or due:
                self.update_order(x)
            order = self.order
        seed = None if self.seed is None else (self.seed + self.frames) % _SEED_LIMIT
        frame = encode(x, self.bits, self.group, self.stripe_rows, self.rounding, seed, self.mode, order)
        self.frames += 1
        return frame

    def decode(self, frame):
        return decode(frame)

    def __repr__(self):
        return (
            f"Codec(bits={self.bits}, group={self.group}, stripe_rows={self.stripe_rows}, "
            f"rounding={self.rounding!r}, seed={self.seed}, mode={self.mode!r}, "
            f"refresh_every={self.refresh_every})"
        )
