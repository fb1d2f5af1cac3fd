"""The messages edge and cloud exchange, as bytes: the envelope, chunking for the transport, and errors.

A logical message is an *envelope*::

    magic "ELCM" | version u8 | kind u8 | blob count u16 | meta length u32 | blob lengths u32 x count
    | meta (UTF-8 JSON object) | blobs

little-endian. ``meta`` carries small fields (step, shapes, loss); blobs carry the payloads (an SGQ /
uniform / fp16 frame, raw float32 bytes, labels). Every length is checked against the bytes received
before anything is sliced, so a hostile peer gets a :class:`ProtocolError`, never an exception from
deep inside numpy or a large allocation.

On the gRPC stream each envelope travels as one or more *chunks* (gRPC messages) of at most
:data:`CHUNK_BYTES` payload bytes, each prefixed by one flag byte (1 = last chunk of the envelope).
Both sides set gRPC's send/receive limits to :data:`GRPC_MESSAGE_LIMIT`, so any single message larger
than a chunk is refused by gRPC itself (``RESOURCE_EXHAUSTED``), and the reassembled envelope is
bounded by ``max_message_bytes``. Bytes on the wire are counted as the chunk bytes (envelope plus one
flag byte per chunk); HTTP/2 and TLS framing are not included.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Dict, Iterable, Iterator, List, Sequence, Tuple

__all__ = [
    "CollabError", "AuthenticationError", "ConnectionLost", "ProtocolError",
    "HELLO", "WELCOME", "TRAIN", "GRAD", "EVAL", "EVAL_RESULT", "CALIBRATE", "CALIBRATED", "BYE", "PULL", "STATE",
    "pack", "unpack", "chunks", "reassemble", "Reassembler", "wire_bytes",
    "CHUNK_BYTES", "GRPC_MESSAGE_LIMIT", "IDLE_TIMEOUT", "MAX_INPUT_ELEMENTS", "MAX_MESSAGE_BYTES", "PROTOCOL_VERSION",
    "WireStats",
]

PROTOCOL_VERSION = 1
MAGIC = b"ELCM"
_HEAD = struct.Struct("<4sBBHI")
_MAX_BLOBS = 8
_MAX_META = 1 << 16

#: Payload bytes per gRPC message (a chunk of an envelope).
CHUNK_BYTES = 1 << 20
#: The gRPC send/receive limit both sides configure: one chunk plus its flag byte, with slack.
GRPC_MESSAGE_LIMIT = CHUNK_BYTES + 1024
#: Default bound on a reassembled envelope (a batch of 256 fp32 16x14x14 features is 12.8 MB).
MAX_MESSAGE_BYTES = 256 << 20
#: Default seconds the cloud lets a stream stay silent (or take to finish a message it started).
IDLE_TIMEOUT = 60.0
#: Default cap on the values per sample (C·H·W) a HELLO may fix the cloud's model to (a 512x512 gray or
#: 295x295 RGB image); the model and its optimizer grow with it. ``--max-input-elements`` changes it.
MAX_INPUT_ELEMENTS = 1 << 18

HELLO, WELCOME, TRAIN, GRAD, EVAL, EVAL_RESULT, BYE, CALIBRATE, CALIBRATED = 1, 2, 3, 4, 5, 6, 7, 8, 9
#: PULL: an edge asks for the cloud part's weights (``join --save-full``); STATE: the reply, one blob of
#: safetensors bytes (the cloud model's state dict and optimizer arrays) and the optimizer's JSON tree in meta.
PULL, STATE = 10, 11
KIND_NAMES = {HELLO: "HELLO", WELCOME: "WELCOME", TRAIN: "TRAIN", GRAD: "GRAD", EVAL: "EVAL",
              EVAL_RESULT: "EVAL_RESULT", BYE: "BYE", CALIBRATE: "CALIBRATE", CALIBRATED: "CALIBRATED",
              PULL: "PULL", STATE: "STATE"}


class CollabError(RuntimeError):
    """Collaborative training failed: the peer refused us, went away, or broke the protocol."""


class AuthenticationError(CollabError):
    """The cloud refused this edge's token."""


class ConnectionLost(CollabError):
    """The connection to the peer broke (cloud restarted, network gone): an edge may reconnect and resume."""


class ProtocolError(CollabError, ValueError):
    """Bytes from the peer are not a valid message (the message names what is wrong)."""


def pack(kind: int, meta: Dict[str, Any], blobs: Sequence[bytes] = ()) -> bytes:
    """One envelope of ``kind`` with JSON ``meta`` and binary ``blobs``."""
    if kind not in KIND_NAMES:
        raise ValueError(f"kind: unknown message kind {kind}")
    if len(blobs) > _MAX_BLOBS:
        raise ValueError(f"blobs: at most {_MAX_BLOBS}, got {len(blobs)}")
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    if len(meta_bytes) > _MAX_META:
        raise ValueError(f"meta: {len(meta_bytes)} bytes of JSON, at most {_MAX_META}")
    head = _HEAD.pack(MAGIC, PROTOCOL_VERSION, kind, len(blobs), len(meta_bytes))
    lens = struct.pack(f"<{len(blobs)}I", *(len(b) for b in blobs))
    return b"".join([head, lens, meta_bytes, *blobs])


def unpack(message: bytes) -> Tuple[int, Dict[str, Any], List[bytes]]:
    """``(kind, meta, blobs)`` of an envelope; :class:`ProtocolError` for anything malformed."""
    view = memoryview(message)
    if len(view) < _HEAD.size:
        raise ProtocolError(f"message of {len(view)} bytes is shorter than the {_HEAD.size}-byte envelope header")
    magic, version, kind, nblobs, meta_len = _HEAD.unpack_from(view)
    if magic != MAGIC:
        raise ProtocolError(f"bad envelope magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"envelope version {version} is not supported (this side speaks {PROTOCOL_VERSION})")
    if kind not in KIND_NAMES:
        raise ProtocolError(f"unknown message kind {kind}")
    if nblobs > _MAX_BLOBS or meta_len > _MAX_META:
        raise ProtocolError(f"envelope declares {nblobs} blobs and {meta_len} bytes of meta "
                            f"(limits {_MAX_BLOBS}, {_MAX_META})")
    at = _HEAD.size + 4 * nblobs
    if len(view) < at:
        raise ProtocolError("envelope truncated inside the blob lengths")
    lens = struct.unpack_from(f"<{nblobs}I", view, _HEAD.size)
    if at + meta_len + sum(lens) != len(view):
        raise ProtocolError(f"envelope lengths disagree: header says {at + meta_len + sum(lens)} bytes, "
                            f"got {len(view)}")
    try:
        meta = json.loads(bytes(view[at:at + meta_len]).decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"envelope meta is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ProtocolError(f"envelope meta must be a JSON object, got {type(meta).__name__}")
    at += meta_len
    blobs = []
    for n in lens:
        blobs.append(bytes(view[at:at + n]))
        at += n
    return kind, meta, blobs


def chunks(message: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The gRPC messages carrying ``message``: flag byte (1 = last) + up to ``chunk_bytes`` bytes."""
    n = len(message)
    start = 0
    while True:
        end = min(start + chunk_bytes, n)
        yield (b"\x01" if end >= n else b"\x00") + message[start:end]
        if end >= n:
            return
        start = end


def wire_bytes(message_len: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Bytes :func:`chunks` puts on the wire for a message of ``message_len`` bytes."""
    return message_len + max(1, -(-message_len // chunk_bytes))


class Reassembler:
    """Joins chunks back into envelopes, refusing anything larger than ``max_message_bytes``."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.max_message_bytes = int(max_message_bytes)
        self._parts: List[bytes] = []
        self._size = 0
        self.wire_bytes = 0

    def feed(self, chunk: bytes) -> "bytes | None":
        """Adds one chunk; returns the whole envelope when ``chunk`` was its last one, else None."""
        if not isinstance(chunk, (bytes, bytearray)) or len(chunk) == 0:
            raise ProtocolError("empty chunk (every chunk starts with a flag byte)")
        flag = chunk[0]
        if flag not in (0, 1):
            raise ProtocolError(f"bad chunk flag {flag} (expected 0 = more, 1 = last)")
        self.wire_bytes += len(chunk)
        self._size += len(chunk) - 1
        if self._size > self.max_message_bytes:
            raise ProtocolError(f"message exceeds the limit of {self.max_message_bytes} bytes "
                                f"(raise --max-message-mb on both sides, or send smaller batches)")
        self._parts.append(bytes(chunk[1:]))
        if flag == 0:
            return None
        message = b"".join(self._parts)
        self._parts, self._size = [], 0
        return message

    @property
    def pending(self) -> bool:
        """True while a message is partially received (discarded if the stream ends)."""
        return bool(self._parts)


def reassemble(stream: Iterable[bytes], max_message_bytes: int = MAX_MESSAGE_BYTES) -> Iterator[bytes]:
    """Envelopes from a stream of chunks; a trailing partial envelope is dropped."""
    r = Reassembler(max_message_bytes)
    for chunk in stream:
        message = r.feed(chunk)
        if message is not None:
            yield message


class WireStats:
    """Bytes on the wire (as :func:`wire_bytes` counts them) per direction and message kind, and the samples
    they carried. Edge and cloud keep one each for a session and count the same envelopes."""

    def __init__(self) -> None:
        self.up: Dict[str, int] = {}
        self.down: Dict[str, int] = {}
        self.train_samples = 0
        self.eval_samples = 0

    def count(self, direction: str, kind: int, message_len: int) -> None:
        table = self.up if direction == "up" else self.down
        name = KIND_NAMES.get(kind, str(kind))
        table[name] = table.get(name, 0) + wire_bytes(message_len)

    @property
    def bytes_up(self) -> int:
        return sum(self.up.values())

    @property
    def bytes_down(self) -> int:
        return sum(self.down.values())

    def summary(self) -> Dict[str, Any]:
        """Totals, and the training traffic per trained sample: features + labels up, gradients down."""
        n = max(self.train_samples, 1)
        up = self.up.get("TRAIN", 0) / n if self.train_samples else None
        down = self.down.get("GRAD", 0) / n if self.train_samples else None
        return {
            "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
            "train_samples": self.train_samples, "eval_samples": self.eval_samples,
            "bytes_up_per_sample": up, "bytes_down_per_sample": down,
            "bytes_per_sample": None if up is None else up + down,
        }
