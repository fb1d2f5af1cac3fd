"""Collaborative (split) learning: edge devices train the first layers of a model, one cloud trains the rest.

- :func:`split_model` / :func:`build_split`: a ``Sequential`` cut at a layer index into edge and cloud parts.
- :class:`TensorCodec`: features and gradients as bytes in the modes ``fp32`` (raw), ``fp16``, ``uniform``
  (per-tensor b-bit) and ``sgq`` (SGQ b-bit), all through the same code path.
- :class:`Cloud` / :class:`CloudSession`: the cloud model, its lock, one session per edge.
- :class:`Edge` / :func:`train_edge`: an edge device's step (forward, encode, send, receive gradients,
  backward) and training loop; reconnection with :class:`RetryPolicy` after a :class:`ConnectionLost`,
  exactly-once steps across cloud restarts (see :mod:`edgelearn.collab.cloud`), saving the edge part or the
  whole model (``Edge.save`` / ``Edge.save_full``).
- Transports: :class:`LocalTransport` (in-process, for benchmarks and tests) and, over gRPC bidirectional
  streaming, :class:`CloudServer` and :class:`GrpcTransport` (in :mod:`edgelearn.collab.transport`; imported
  lazily so ``import edgelearn`` does not load grpc).
- :mod:`edgelearn.collab.protocol`: the envelope, chunking, byte counting and the errors.

The command line: ``edgelearn collab serve`` and ``edgelearn collab join``.
"""

from .cloud import ArchitectureMismatch, Cloud, CloudSession
from .codec import MODES, TensorCodec, relative_l2
from .edge import Edge, LocalTransport, RetryPolicy, train_edge
from .protocol import AuthenticationError, CollabError, ConnectionLost, ProtocolError, WireStats
from .split import build_split, output_shape, split_model

__all__ = [
    "ArchitectureMismatch", "AuthenticationError", "Cloud", "CloudServer", "CloudSession", "CollabError",
    "ConnectionLost", "Edge", "GrpcTransport", "LocalTransport", "RetryPolicy", "MODES", "ProtocolError", "TensorCodec", "WireStats", "build_split",
    "output_shape", "relative_l2", "split_model", "train_edge",
]


def __getattr__(name):
    if name in ("CloudServer", "GrpcTransport"):
        from . import transport

        return getattr(transport, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
