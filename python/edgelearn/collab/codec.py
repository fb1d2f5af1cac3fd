"""How a feature or gradient tensor becomes bytes between edge and cloud, for every mode the split-training
code path compares: ``fp32`` (no codec: raw little-endian float32 bytes), ``fp16`` (the SGQ frame's raw
float16 baseline), ``uniform`` (the SGQ frame's per-tensor b-bit baseline) and ``sgq`` (channel groups x
spatial stripes, b bits).

Features use nearest rounding, gradients stochastic rounding (unbiased) in the quantizing modes. Decoding
treats the bytes as hostile: the frame is validated by the Rust core (:class:`edgelearn.sgq.FrameError`),
its shape must be the one the envelope announced, and the values must be finite.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from .. import sgq
from .protocol import ProtocolError

__all__ = ["MODES", "TensorCodec", "relative_l2"]

#: Wire modes, from no compression to the most.
MODES = ("fp32", "fp16", "uniform", "sgq")


def relative_l2(decoded: np.ndarray, original: np.ndarray) -> float:
    """``‖decoded − original‖ / ‖original‖`` (0 when both are zero)."""
    denom = float(np.linalg.norm(original))
    diff = float(np.linalg.norm(decoded - original))
    return diff / denom if denom > 0 else diff


class TensorCodec:
    """Encodes/decodes one stream of tensors (an edge's features, or the gradients sent back to it).

    ``bits``, ``group`` and ``stripe_rows`` apply to the quantizing modes; ``rounding`` is ``"nearest"``
    for features and ``"stochastic"`` for gradients; ``seed`` makes stochastic rounding reproducible
    (frame ``i`` uses ``seed + i``). In ``sgq`` mode the channel order is computed from the first tensor
    and refreshed every ``refresh_every`` frames; a frame carries it only when it changed, so the frames of
    one stream must be decoded in order by one ``TensorCodec`` (:meth:`decode`; the sender checks its own
    frames with :meth:`decode_sent`). ``ranges`` (``"sample"`` or ``"frame"``) and ``constant_blocks`` apply
    to sgq (see :func:`edgelearn.sgq.encode`); ``send_order="always"`` puts the channel order in every frame
    (for a receiver that decodes each frame on its own, as a Flower ClientApp does). ``clip`` (sgq only; see
    :func:`edgelearn.sgq.encode`) narrows each block's range before encoding; only the sender needs it.
    """

    def __init__(self, mode: str = "sgq", bits: int = 4, group: int = 4, stripe_rows: Optional[int] = None,
                 rounding: str = "nearest", seed: Optional[int] = None, refresh_every: Optional[int] = 50,
                 ranges: str = "sample", constant_blocks: bool = False, send_order: str = "changed",
                 clip: Optional[Tuple[str, float]] = None):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.mode = mode
        self.bits = int(bits)
        self._codec = None
        if mode != "fp32":
            self._codec = sgq.Codec(bits=bits, group=group, stripe_rows=stripe_rows, rounding=rounding,
                                    seed=seed, mode=mode, refresh_every=refresh_every if mode == "sgq" else None,
                                    ranges=ranges if mode == "sgq" else "sample",
                                    constant_blocks=bool(constant_blocks) and mode == "sgq", send_order=send_order,
                                    clip=clip if mode == "sgq" else None)

    def encode(self, x: np.ndarray) -> bytes:
        if self._codec is None:
            return np.ascontiguousarray(x, dtype="<f4").tobytes()
        return self._codec.encode(x)

    def decode(self, blob: bytes, shape: Sequence[int], what: str = "tensor") -> np.ndarray:
        """The float32 tensor of ``shape`` in ``blob``, the next frame of the stream this codec receives;
        :class:`ProtocolError` (or ``sgq.FrameError``, also a ``ValueError``) if the bytes are not exactly
        that."""
        return self._decode(blob, shape, what, sent=False)

    def decode_sent(self, blob: bytes, shape: Sequence[int], what: str = "tensor") -> np.ndarray:
        """Decodes a frame this codec encoded (what the receiver gets), leaving the receiving state alone."""
        return self._decode(blob, shape, what, sent=True)

    def _decode(self, blob: bytes, shape: Sequence[int], what: str, sent: bool) -> np.ndarray:
        shape = _checked_shape(shape, what)
        if self._codec is None:
            expected = 4 * int(np.prod(shape))
            if len(blob) != expected:
                raise ProtocolError(f"{what}: {len(blob)} bytes of fp32 data, expected {expected} for shape {shape}")
            out = np.frombuffer(blob, dtype="<f4").astype(np.float32).reshape(shape)
        else:
            info = sgq.frame_info(blob)
            if tuple(info["shape"]) != shape:
                raise ProtocolError(f"{what}: frame holds shape {tuple(info['shape'])}, the message announced {shape}")
            if info["mode"] != self.mode:
                raise ProtocolError(f"{what}: frame mode {info['mode']!r}, this session uses {self.mode!r}")
            out = self._codec.decode_sent(blob) if sent else self._codec.decode(blob)
        if not np.isfinite(out).all():
            raise ProtocolError(f"{what}: non-finite values (NaN or inf) refused")
        return out

    def __repr__(self) -> str:
        return f"TensorCodec(mode={self.mode!r}, bits={self.bits}, codec={self._codec!r})"


def _checked_shape(shape: Sequence[int], what: str) -> Tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not 2 <= len(shape) <= 4 or not all(
            isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 1 << 24 for s in shape):
        raise ProtocolError(f"{what}: bad shape {shape!r} (expected 2 to 4 positive ints)")
    if int(np.prod(shape, dtype=np.int64)) > 1 << 28:
        raise ProtocolError(f"{what}: shape {tuple(shape)} is absurdly large")
    return tuple(shape)
