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
``stripe_rows`` rows, one range per (sample, group, stripe), or with ``ranges="frame"`` one per
(group, stripe) shared by the samples of the frame), and the baselines ``"uniform"`` (one range for the
whole tensor at ``bits`` bits) and ``"fp16"`` (raw float16 values, ``bits`` ignored).

Frames (version 2) are self-contained unless the encoder was told the receiver already holds the channel
order (``send_order=False``; :class:`Codec` does this when the order has not changed since the last frame
it sent): such a frame says "stream order" and decodes only with that order, from the :class:`Codec` that
received the earlier frame or passed as ``decode(frame, order=...)``; :func:`decode` alone raises
:class:`FrameError`. With ``constant_blocks=True`` a block whose values are all equal in a sample (an
image's empty border after a ReLU) carries one code, and the frame a map of one bit per block. Version 1
frames (no such flags) still decode.

Error bound: with ``lo``/``hi`` the float16 range of an element's block (rounded outwards from the block's
min and max), ``|decode(encode(x)) - x| <= (hi - lo) / (2**bits - 1) / 2`` for nearest rounding and
``< (hi - lo) / (2**bits - 1)`` for stochastic (unbiased) rounding, up to float32 rounding. With ``clip``
(range clipping: each block's range narrowed before the codes are computed; the frame format does not change)
the bound holds for ``x`` clamped to its block's ``[lo, hi]``.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from . import _native
from ._native import FrameError
from .quant import _clip

__all__ = ["encode", "decode", "frame_info", "channel_order", "parse_clip", "Codec", "FrameError", "MODES",
           "RANGES", "HEADER_BYTES"]

#: Encodings a frame can use.
MODES = ("sgq", "uniform", "fp16")
#: Size of the fixed frame header in bytes.
HEADER_BYTES = 56
_ROUNDINGS = ("nearest", "stochastic")
#: Range scopes of mode ``"sgq"``: per (sample, group, stripe) or per (group, stripe) for the frame.
RANGES = ("sample", "frame")
_SEND_ORDER = ("changed", "always")
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


def parse_clip(spec):
    """A range clip as given on a command line or in a config: ``None``, ``""`` or ``"none"`` (no clipping),
    ``"sigma"``/``"minmax"`` (default parameter), ``"sigma:Z"`` or ``"minmax:KAPPA"``; also accepts the
    ``(mode, param)`` tuple or a 2-element list (as JSON carries it). Returns ``None`` or ``(mode, param)``
    with the parameter checked (``z`` finite and > 0, ``kappa`` in (0, 1]); ``ValueError``/``TypeError``
    otherwise."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return None
    if isinstance(spec, str):
        mode, sep, param = spec.strip().partition(":")
        if sep:
            try:
                value = float(param)
            except ValueError:
                raise ValueError(f"clip: {spec!r}: the parameter after ':' must be a number") from None
            spec = (mode, value)
        else:
            spec = mode
    elif isinstance(spec, list) and len(spec) == 2:
        spec = tuple(spec)
    mode, param = _clip(spec)
    if not (math.isfinite(param) and (param > 0 if mode == "sigma" else 0 < param <= 1)):
        raise ValueError(f"clip: {mode} parameter {param} out of range "
                         f"({'z finite and > 0' if mode == 'sigma' else 'kappa in (0, 1]'})")
    return mode, param


def encode(x, bits=4, group=4, stripe_rows=None, rounding="nearest", seed=None, mode="sgq", order=None,
           ranges="sample", send_order=True, constant_blocks=False, clip=None):
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
        ranges: ``"sample"`` (one range per (sample, group, stripe)) or ``"frame"`` (one per (group,
            stripe) shared by the N samples: ``4·G·S`` bytes instead of ``4·N·G·S``). Mode sgq only.
        send_order: ``False`` leaves a non-identity channel order out of the frame, for a receiver that
            holds it already (the frame then needs ``decode(frame, order=...)`` or a :class:`Codec`).
        constant_blocks: a (sample, group, stripe) block whose values are all equal (zero rows after a
            ReLU, a constant background) gets one code instead of one per element; the frame carries a
            map of one bit per block. Mode sgq only. Left out of a frame it would make decode to more
            than 1024 bytes per frame byte.
        clip: range clipping per range block before the codes are computed (Octo's PRC applied to SGQ's
            blocks); the frame format does not change. ``None`` (the block's min and max); ``"sigma"`` /
            ``"sigma:Z"`` / ``("sigma", z)``: ``[max(min, μ − z·σ), min(max, μ + z·σ)]`` with the block's mean and
            population σ; ``"minmax"`` / ``"minmax:KAPPA"`` / ``("minmax", kappa)``: ``kappa·[min, max]`` within ``[min, max]``.
            Values outside the range take the code of its nearer end. Mode sgq only.

    Returns:
        ``bytes``: the frame (56-byte header, permutation if not the identity and ``send_order``, ranges,
        packed codes).
    """
    x = _float32_array(x)
    bits = _int(bits, "bits", 1, 8)
    group = _int(group, "group", 1)
    stripe_rows = _int(stripe_rows, "stripe_rows", 1, allow_none=True) or 0
    rounding = _choice(rounding, "rounding", _ROUNDINGS)
    seed = _int(seed, "seed", 0, _SEED_LIMIT - 1, allow_none=True)
    mode = _choice(mode, "mode", MODES)
    ranges = _choice(ranges, "ranges", RANGES)
    if not isinstance(send_order, (bool, np.bool_)):
        raise TypeError(f"send_order: expected a bool, got {type(send_order).__name__}")
    if order is not None:
        if mode != "sgq":
            raise ValueError(f"order: a channel order only applies to mode 'sgq', not {mode!r}")
        order = _order(order, x.shape[1])
    if ranges != "sample" and mode != "sgq":
        raise ValueError(f"ranges: {ranges!r} only applies to mode 'sgq', not {mode!r}")
    if not isinstance(constant_blocks, (bool, np.bool_)):
        raise TypeError(f"constant_blocks: expected a bool, got {type(constant_blocks).__name__}")
    if constant_blocks and mode != "sgq":
        raise ValueError(f"constant_blocks: only applies to mode 'sgq', not {mode!r}")
    clip = parse_clip(clip)
    if clip is not None and mode != "sgq":
        raise ValueError(f"clip: range clipping only applies to mode 'sgq', not {mode!r}")
    return _native._sgq_encode(x, mode, bits, group, stripe_rows, rounding, seed, order, ranges, bool(send_order),
                               bool(constant_blocks), clip)


def decode(frame, order=None):
    """Decodes an SGQ frame into a new float32 array of the shape that was encoded.

    ``order`` is the channel order of the frame's stream, needed only by a frame that leaves it out
    (``frame_info(frame)["order"] == "stream"``) and ignored otherwise.

    Raises:
        FrameError: the bytes are not a valid frame (bad magic, unknown version, truncated, trailing
            bytes, wrong CRC, lengths that disagree with the header, absurd shapes, invalid permutation
            or ranges), or the frame uses its stream's channel order and ``order`` is missing or not a
            permutation of its channels. Nothing sized by the header is allocated before the frame is
            validated.
    """
    if order is not None:
        arr = np.asarray(order)
        if arr.ndim != 1 or arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() >= 1 << 32)):
            raise TypeError(f"order: expected a 1-D sequence of non-negative ints, got {arr.dtype} {arr.shape}")
        order = [int(v) for v in arr]
    return _native._sgq_decode(_frame_bytes(frame), order)


def frame_info(frame):
    """Validates a frame (CRC included) and returns its header: ``version``, ``dtype``, ``mode``,
    ``bits``, ``rounding``, ``permutation`` (present?), ``order`` (``"identity"``, ``"frame"`` or
    ``"stream"``), ``order_list`` (the permutation carried, or ``None``), ``ranges`` (``"sample"``,
    ``"frame"``, ``"tensor"`` or ``"none"``), ``constant_map`` (present?), ``constant_blocks`` (how many
    blocks it marks), ``map_bytes``, ``shape`` (as encoded), ``shape_4d``, ``group``,
    ``stripe_rows``, ``permutation_bytes``, ``ranges_bytes``, ``codes_bytes``, ``header_bytes``,
    ``frame_bytes``, ``crc32``. Raises :class:`FrameError` like :func:`decode`."""
    return _native._sgq_frame_info(_frame_bytes(frame))


def channel_order(x):
    """The channel order SGQ computes for ``x`` (channels sorted by range width, then midpoint)."""
    return _native._sgq_channel_order(_float32_array(x))


class Codec:
    """An SGQ encoder/decoder for one stream of frames: keeps its settings and the channel order.

    The order is computed from the first tensor encoded, then recomputed every ``refresh_every`` frames
    (``None``: only when :meth:`update_order` is called). With ``send_order="changed"`` (default) a frame
    carries the order only when it differs from the last one this codec sent; the frames in between
    leave it out (saving ``2·C`` bytes each) and decode only with a :class:`Codec` that decoded the
    earlier frames of the same stream, in order (or ``decode(frame, order=...)``). ``send_order="always"``
    makes every frame self-contained. The encoding side and the decoding side keep separate state
    (:attr:`order` sent, :attr:`received_order`), so one object may do both for a stream.
    ``ranges``, ``constant_blocks`` and ``clip`` as in :func:`encode`. With ``group=1`` the order changes nothing
    and is not computed (frames are in the identity order). With stochastic rounding and a
    ``seed``, frame ``i`` uses seed ``seed + i`` so successive frames draw independent noise, reproducibly.
    """

    def __init__(self, bits=4, group=4, stripe_rows=None, rounding="nearest", seed=None, mode="sgq",
                 refresh_every=None, ranges="sample", send_order="changed", constant_blocks=False, clip=None):
        self.bits = _int(bits, "bits", 1, 8)
        self.group = _int(group, "group", 1)
        self.stripe_rows = _int(stripe_rows, "stripe_rows", 1, allow_none=True)
        self.rounding = _choice(rounding, "rounding", _ROUNDINGS)
        self.seed = _int(seed, "seed", 0, _SEED_LIMIT - 1, allow_none=True)
        self.mode = _choice(mode, "mode", MODES)
        self.refresh_every = _int(refresh_every, "refresh_every", 1, allow_none=True)
        self.ranges = _choice(ranges, "ranges", RANGES)
        if self.ranges != "sample" and self.mode != "sgq":
            raise ValueError(f"ranges: {self.ranges!r} only applies to mode 'sgq', not {self.mode!r}")
        self.send_order = _choice(send_order, "send_order", _SEND_ORDER)
        if not isinstance(constant_blocks, (bool, np.bool_)):
            raise TypeError(f"constant_blocks: expected a bool, got {type(constant_blocks).__name__}")
        if constant_blocks and self.mode != "sgq":
            raise ValueError(f"constant_blocks: only applies to mode 'sgq', not {self.mode!r}")
        self.constant_blocks = bool(constant_blocks)
        self.clip = parse_clip(clip)
        if self.clip is not None and self.mode != "sgq":
            raise ValueError(f"clip: range clipping only applies to mode 'sgq', not {self.mode!r}")
        self.order = None
        self.frames = 0
        self._sent_order = None
        #: The channel order of the last frame decoded that carried one (or was the identity).
        self.received_order = None

    def update_order(self, x):
        """Recomputes the channel order from ``x`` and keeps it for the next frames."""
        self.order = channel_order(x)
        return self.order

    def encode(self, x):
        x = _float32_array(x)
        order = None
        if self.mode == "sgq" and self.group > 1:
            stale = self.order is None or len(self.order) != x.shape[1]
            due = self.refresh_every is not None and self.frames % self.refresh_every == 0
            if stale or due:
                self.update_order(x)
            order = self.order
        seed = None if self.seed is None else (self.seed + self.frames) % _SEED_LIMIT
        send = self.send_order == "always" or order is None or order != self._sent_order
        frame = encode(x, self.bits, self.group, self.stripe_rows, self.rounding, seed, self.mode, order,
                       self.ranges, send, self.constant_blocks, self.clip)
        if order is not None:
            self._sent_order = list(order)
        self.frames += 1
        return frame

    def decode(self, frame):
        """Decodes the next frame of the stream; a frame that carries its order (or is in the identity
        order) sets :attr:`received_order`, one that leaves it out uses it.

        Raises:
            FrameError: as :func:`decode`; also for a frame that leaves the order out when no earlier
                frame of this stream gave one.
        """
        frame = _frame_bytes(frame)
        info = _native._sgq_frame_info(frame)
        if info["order"] == "stream":
            if self.received_order is None:
                raise FrameError(
                    "the frame carries no channel order: it uses the one an earlier frame of its stream sent, "
                    "and this Codec has decoded no frame with an order yet"
                )
            return _native._sgq_decode(frame, self.received_order)
        out = _native._sgq_decode(frame, None)
        if info["mode"] == "sgq":
            c = info["shape_4d"][1]
            self.received_order = info["order_list"] if info["order"] == "frame" else list(range(c))
        return out

    def decode_sent(self, frame):
        """Decodes a frame this codec just encoded (with the order it sent), without touching the
        receiving state: what the other side will decode."""
        return decode(frame, order=self.order if self.mode == "sgq" and self.group > 1 else None)

    def __repr__(self):
        return (
            f"Codec(bits={self.bits}, group={self.group}, stripe_rows={self.stripe_rows}, "
            f"rounding={self.rounding!r}, seed={self.seed}, mode={self.mode!r}, "
            f"refresh_every={self.refresh_every}, ranges={self.ranges!r}, send_order={self.send_order!r}, "
            f"constant_blocks={self.constant_blocks}, clip={self.clip!r})"
        )
