"""gRPC transport: the cloud serves one bidirectional-streaming method, an edge dials it.

The service is ``edgelearn.collab.Cloud/Train`` (stream of bytes in, stream of bytes out), registered with
grpcio's generic handlers, so no ``.proto`` compilation (protoc, grpcio-tools) and no generated code are
needed: every gRPC message is a raw chunk of an envelope (:mod:`edgelearn.collab.protocol`).

- Authentication: with a token, the edge sends ``authorization: Bearer <token>`` metadata; a missing or
  wrong token ends the call with ``UNAUTHENTICATED`` before any session exists, and the edge raises
  :class:`~edgelearn.collab.protocol.AuthenticationError`. Without TLS the token travels in clear.
- TLS: the cloud takes a PEM certificate chain and key; the edge takes the PEM root certificate it trusts
  (``server_name`` overrides the host name checked against the certificate).
- Size limits: both sides set gRPC's send/receive limits to one chunk (:data:`GRPC_MESSAGE_LIMIT`); larger
  envelopes are chunked, and a reassembled envelope above ``max_message_bytes`` ends the call with
  ``INVALID_ARGUMENT`` naming the limit.
- Slots: at most ``max_edges`` edges train at once, and a stream takes a slot only when its HELLO has arrived
  whole (an edge beyond the limit gets ``RESOURCE_EXHAUSTED`` naming ``--max-edges``). Streams that have not
  got that far (connecting, authenticating, sending HELLO) are limited separately (``max_pending``), so idle
  or half-sent streams cannot lock real edges out.
- Deadlines: a stream that sends nothing for ``idle_timeout`` seconds, or takes longer than that to finish a
  message it started, is ended with ``DEADLINE_EXCEEDED`` and its session ``dropped``.
- Failures: bad bytes from an edge end *that* call (``INVALID_ARGUMENT``; an edge that does not fit the model:
  ``FAILED_PRECONDITION``; an input shape above the cloud's limit or memory the cloud cannot get:
  ``RESOURCE_EXHAUSTED``); any other error in a handler ends the call with ``INTERNAL``, never an escaped
  exception; a vanished edge ends its session as ``dropped``. The server keeps serving.
"""

from __future__ import annotations

import hmac
import queue
import threading
import time
from concurrent import futures
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import grpc

from .cloud import ArchitectureMismatch, Cloud, InputTooLarge
from .protocol import (CHUNK_BYTES, GRPC_MESSAGE_LIMIT, IDLE_TIMEOUT, MAX_MESSAGE_BYTES, AuthenticationError,
                       CollabError, ConnectionLost, ProtocolError, Reassembler, chunks)

__all__ = ["CloudServer", "GrpcTransport", "SERVICE", "METHOD", "IDLE_TIMEOUT"]


SERVICE = "edgelearn.collab.Cloud"
METHOD = f"/{SERVICE}/Train"
TOKEN_HEADER = "authorization"


def _options(extra: Tuple[Tuple[str, Any], ...] = ()) -> List[Tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", GRPC_MESSAGE_LIMIT),
        ("grpc.max_receive_message_length", GRPC_MESSAGE_LIMIT),
        # notice a silent peer (cable pulled, board powered off) within about a minute
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        *extra,
    ]


def _read(path_or_bytes: Any, what: str) -> bytes:
    if isinstance(path_or_bytes, bytes):
        return path_or_bytes
    try:
        with open(path_or_bytes, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path_or_bytes!r}: {exc.strerror}") from None


class CloudServer:
    """Serves ``cloud`` over gRPC on ``host:port`` (port 0 picks a free one; :attr:`port` tells which)."""

    def __init__(self, cloud: Cloud, host: str = "127.0.0.1", port: int = 0, *, token: Optional[str] = None,
                 tls_cert: Any = None, tls_key: Any = None, max_edges: int = 8,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, idle_timeout: float = IDLE_TIMEOUT,
                 max_pending: Optional[int] = None, log: Callable[[str], None] = lambda m: None):
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key: give both (PEM certificate chain and private key) or neither")
        if isinstance(max_edges, bool) or not isinstance(max_edges, int) or max_edges < 1:
            raise ValueError(f"max_edges: expected an int >= 1, got {max_edges!r}")
        if not (isinstance(port, int) and not isinstance(port, bool) and 0 <= port <= 65535):
            raise ValueError(f"port: expected an int in [0, 65535] (0 picks a free one), got {port!r}")
        if not (isinstance(idle_timeout, (int, float)) and idle_timeout > 0 and idle_timeout < float("inf")):
            raise ValueError(f"idle_timeout: expected a finite number of seconds > 0, got {idle_timeout!r}")
        if not (isinstance(max_message_bytes, int) and max_message_bytes >= 1):
            raise ValueError(f"max_message_bytes: expected an int >= 1, got {max_message_bytes!r}")
        self.cloud, self.token, self.log = cloud, token, log
        self.max_message_bytes = int(max_message_bytes)
        self.max_edges, self.idle_timeout = max_edges, float(idle_timeout)
        self.max_pending = max(8, max_edges) if max_pending is None else int(max_pending)
        self._slots_lock = threading.Lock()
        self._training = 0  # streams holding an edge slot (HELLO received)
        self.tls = tls_cert is not None
        if self.tls:  # read and check the PEM pair before anything listens
            key, cert = _read(tls_key, "tls_key"), _read(tls_cert, "tls_cert")
            _check_pem(cert, "tls_cert", "CERTIFICATE")
            _check_pem(key, "tls_key", "PRIVATE KEY")
        workers = max_edges + self.max_pending  # one thread per live stream (grpcio's sync server)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="collab-edge"),
            options=_options(), maximum_concurrent_rpcs=workers)
        handler = grpc.stream_stream_rpc_method_handler(self._train)  # no (de)serializers: raw bytes
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Train": handler}),))
        address = f"{host}:{port}"
        _probe_listen(host, port, address)
        try:
            if self.tls:
                creds = grpc.ssl_server_credentials([(key, cert)])
                self.port = self._server.add_secure_port(address, creds)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError:  # grpcio raises "Failed to bind to address ..." for every cause
            self.port = 0
        if not self.port:
            raise CollabError(f"cannot listen on {address}: the port is in use, or {host!r} is not an address of "
                              "this machine (use --host 127.0.0.1, 0.0.0.0 or one of its addresses, and a free "
                              "--port; 0 picks one)")
        self.host = host

    def start(self) -> "CloudServer":
        self._server.start()
        return self

    def stop(self, grace: Optional[float] = 1.0) -> None:
        self._server.stop(grace).wait()

    def __enter__(self) -> "CloudServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop(0)

    def _authorized(self, context: grpc.ServicerContext) -> bool:
        if self.token is None:
            return True
        sent = dict(context.invocation_metadata()).get(TOKEN_HEADER, "")
        return hmac.compare_digest(str(sent).encode(), f"Bearer {self.token}".encode())

    def _take_slot(self) -> bool:
        with self._slots_lock:
            if self._training >= self.max_edges:
                return False
            self._training += 1
            return True

    def _free_slot(self) -> None:
        with self._slots_lock:
            self._training -= 1

    def _chunks_with_deadline(self, requests: Iterator[bytes], reassembler: Reassembler) -> Iterator[bytes]:
        """The stream's chunks, read on a helper thread so a silent peer cannot hold this handler: raises
        ``TimeoutError`` after ``idle_timeout`` seconds without a chunk, or with a message unfinished that long."""
        inbox: "queue.Queue[Any]" = queue.Queue(maxsize=4)  # bounded: gRPC flow control still applies
        done = threading.Event()

        def hand_over(item: Any) -> None:
            while not done.is_set():
                try:
                    inbox.put(item, timeout=0.5)
                    return
                except queue.Full:
                    continue

        def pump() -> None:
            try:
                for chunk in requests:
                    hand_over(chunk)
                    if done.is_set():
                        return
                hand_over(_END)
            except BaseException as exc:  # grpc.RpcError when the call ends: hand it over
                hand_over(exc)

        threading.Thread(target=pump, name="collab-read", daemon=True).start()
        try:
            yield from self._take_chunks(inbox, reassembler)
        finally:
            done.set()

    def _take_chunks(self, inbox: "queue.Queue[Any]", reassembler: Reassembler) -> Iterator[bytes]:
        started: Optional[float] = None  # when the unfinished message began
        while True:
            now = time.monotonic()
            wait = self.idle_timeout if started is None else started + self.idle_timeout - now
            try:
                item = inbox.get(timeout=max(wait, 0.0))
            except queue.Empty:
                what = ("finished no message it started" if started is not None else "sent nothing")
                raise TimeoutError(f"the stream {what} for {self.idle_timeout:g} s (the cloud's idle timeout, "
                                   "--idle-timeout)") from None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            if started is None:
                started = now
            yield item
            if not reassembler.pending:
                started = None

    def _train(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        peer = context.peer()
        if not self._authorized(context):
            self.log(f"refused {peer}: wrong or missing token")
            self.cloud.record_refusal(peer, "wrong or missing token")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing token")
        session = self.cloud.open_session(peer)
        status, reason = "dropped", ""
        code: Optional[grpc.StatusCode] = None
        reassembler = Reassembler(self.max_message_bytes)
        has_slot = False
        try:
            for chunk in self._chunks_with_deadline(requests, reassembler):
                message = reassembler.feed(chunk)
                if message is None:
                    continue
                if not has_slot:  # the first whole message (HELLO): only now does this stream take a slot
                    if not self._take_slot():
                        raise _Full(f"the cloud is already training {self.max_edges} edges, its limit "
                                    f"(--max-edges {self.max_edges}); retry when one has finished")
                    has_slot = True
                reply = session.handle(message)
                yield from chunks(reply)
            if session.finished:
                status = "completed"
            else:
                reason = "stream closed without BYE" + (" (mid-message: partial message discarded)"
                                                        if reassembler.pending else "")
        except TimeoutError as exc:
            reason, code = str(exc), grpc.StatusCode.DEADLINE_EXCEEDED
        except (_Full, InputTooLarge) as exc:
            status, reason, code = "rejected", str(exc), grpc.StatusCode.RESOURCE_EXHAUSTED
        except MemoryError as exc:
            status, code = "rejected", grpc.StatusCode.RESOURCE_EXHAUSTED
            reason = f"the cloud ran out of memory for this edge: {exc or 'MemoryError'}"
        except ArchitectureMismatch as exc:
            status, reason, code = "rejected", str(exc), grpc.StatusCode.FAILED_PRECONDITION
        except ValueError as exc:  # ProtocolError, sgq.FrameError: hostile or broken bytes
            status, reason, code = "rejected", str(exc), grpc.StatusCode.INVALID_ARGUMENT
        except grpc.RpcError as exc:  # the edge went away while we read
            reason = f"stream failed: {exc}"
        except GeneratorExit:  # the call was cancelled while we answered
            reason = "cancelled"
            raise
        except Exception as exc:  # a bug: end this call, keep serving the others
            status, reason, code = "rejected", f"internal error: {type(exc).__name__}: {exc}", grpc.StatusCode.INTERNAL
        finally:
            if has_slot:
                self._free_slot()
            summary = self.cloud.close_session(session, status, reason)
            self.log(_describe(summary))
        if code is not None:
            context.abort(code, reason)


def _probe_listen(host: str, port: int, address: str) -> None:
    """Binds a plain socket to ``host:port`` first, so a bad address or a port in use is reported with its real
    reason (grpcio only logs "Failed to add port" and returns 0)."""
    import socket

    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise CollabError(f"cannot listen on {address}: {host!r} is not an address of this machine ({exc}); use "
                          "--host 127.0.0.1, 0.0.0.0 or one of its addresses") from None
    family, kind, proto, _, sockaddr = infos[0]
    try:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no obstacle
            s.bind(sockaddr)
    except OSError as exc:
        hint = "; choose another --port (0 picks a free one)" if port else ""
        raise CollabError(f"cannot listen on {address}: {exc.strerror or exc}{hint}") from None


class _Full(CollabError):
    """Every edge slot is taken (gRPC: RESOURCE_EXHAUSTED)."""


def _check_pem(data: bytes, what: str, kind: str) -> None:
    """A cheap check that ``data`` is PEM holding a ``kind`` block (grpcio only says "Failed to bind")."""
    if f"-----BEGIN".encode() not in data or kind.encode() not in data:
        raise ValueError(f"{what}: not a PEM file with a {kind} block (expected '-----BEGIN ... {kind}-----')")


def _describe(s: Dict[str, Any]) -> str:
    text = f"{s['name']} {s['status']} after {s['steps']} steps"
    if s.get("bytes_up_per_sample") is not None:
        text += (f": {s['bytes_up_per_sample']:.1f} B/sample up, {s['bytes_down_per_sample']:.1f} B/sample down "
                 f"({s['bytes_up']} B up, {s['bytes_down']} B down in all)")
    if s.get("reason"):
        text += f" [{s['reason']}]"
    return text


_END = object()


class GrpcTransport:
    """An edge's connection to a :class:`CloudServer`: one bidirectional stream, one envelope in flight.

    ``target`` is ``HOST:PORT``. With ``root_cert`` (PEM path or bytes) the channel uses TLS;
    ``server_name`` overrides the name checked against the cloud's certificate. Waits up to
    ``connect_timeout`` seconds for the cloud.
    """

    def __init__(self, target: str, *, token: Optional[str] = None, root_cert: Any = None,
                 server_name: Optional[str] = None, connect_timeout: float = 30.0,
                 max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.target = target
        self.max_message_bytes = int(max_message_bytes)
        extra: Tuple[Tuple[str, Any], ...] = ()
        if server_name:
            extra = (("grpc.ssl_target_name_override", server_name),)
        if root_cert is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=_read(root_cert, "root_cert"))
            self._channel = grpc.secure_channel(target, creds, options=_options(extra))
        else:
            self._channel = grpc.insecure_channel(target, options=_options(extra))
        try:
            grpc.channel_ready_future(self._channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise ConnectionLost(f"cannot reach the cloud at {target} within {connect_timeout:g} s (is `edgelearn "
                              "collab serve` running there, with TLS on both sides or on neither?)") from None
        self._requests: "queue.Queue[Any]" = queue.Queue()
        metadata = ((TOKEN_HEADER, f"Bearer {token}"),) if token is not None else None
        call = self._channel.stream_stream(METHOD)  # no (de)serializers: raw bytes
        self._responses = call(iter(self._requests.get, _END), metadata=metadata)
        self._closed = False
        self._lock = threading.Lock()

    def exchange(self, message: bytes) -> bytes:
        """Sends one envelope and returns the cloud's reply envelope."""
        with self._lock:
            if self._closed:
                raise CollabError("exchange on a closed transport")
            for c in chunks(message):
                self._requests.put(c)
            reassembler = Reassembler(self.max_message_bytes)
            try:
                for chunk in self._responses:
                    reply = reassembler.feed(chunk)
                    if reply is not None:
                        return reply
            except grpc.RpcError as exc:
                raise self._error(exc) from None
            raise ConnectionLost(f"the cloud at {self.target} closed the stream without answering")

    def _error(self, exc: grpc.RpcError) -> CollabError:
        code, details = exc.code(), exc.details()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return AuthenticationError(f"the cloud at {self.target} refused this edge: {details} "
                                       "(pass the cloud's shared token with --token)")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            if details and "larger than max" in details:
                return CollabError(f"the cloud at {self.target} refused a message: {details} (gRPC messages are "
                                   f"limited to {GRPC_MESSAGE_LIMIT} bytes; envelopes travel in {CHUNK_BYTES}-byte "
                                   "chunks)")
            if details and "Concurrent RPC limit" in details:
                return CollabError(f"the cloud at {self.target} has no free connection: {details} (it accepts "
                                   "--max-edges training edges plus as many connecting ones); retry later")
            return CollabError(f"the cloud at {self.target} refused this edge: {details}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return ConnectionLost(f"lost the cloud at {self.target}: {details}")
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
            return ProtocolError(f"the cloud at {self.target} rejected this edge ({code.name}): {details}")
        return CollabError(f"the cloud at {self.target} ended the session ({code.name}): {details}")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._requests.put(_END)
            try:
                for _ in self._responses:
                    pass
            except grpc.RpcError:
                pass
            self._channel.close()
