"""The tunnel's WebSocket, seen as a byte stream: wsproto's frames over a trio stream.

The tunnel carries one continuous HTTP/2 byte stream inside WebSocket binary messages; message boundaries
mean nothing (DESIGN §4). So :class:`WebSocketStream` hands on each frame's payload as it arrives instead
of assembling messages, and runs no task of its own: the HTTP/2 session's reader reads the socket through
it. A WebSocket library with a reader task and a message queue per connection cost each session a task, a
channel and a copy of every message (measured: about a third of the connector's time for a large job, and
several KiB of every idle session's memory on a relay holding thousands).

The handshake is wsproto's too (:func:`connect` for the connector, :class:`UpgradeRequest` for the relay);
the relay reads the request head itself first, bounded, so that it can refuse a connection (busy, draining,
wrong path) before any WebSocket work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

SUBPROTOCOL = "printrelay.h2.v1"
TUNNEL_PATH = "/v1/tunnel"
# The relay names itself on the upgrade (101) answer: which replica answered, and how many are alive, so a
# connector keeps sessions to distinct replicas, and one session to a relay that runs alone.
REPLICA_HEADER = "x-printrelay-replica"
REPLICAS_HEADER = "x-printrelay-replicas"

# Frames are batched into messages of at most this size (DESIGN §4). Nothing buffers a whole message, but a
# peer sending larger ones breaks the protocol: the WebSocket is closed with 1009 (message too big).
MAX_BATCH_BYTES = 256 * 1024
MAX_MESSAGE_BYTES = 2 * MAX_BATCH_BYTES
RECEIVE_BYTES = 256 * 1024  # one socket read: 64 KiB reads cost twice the CPU per GiB (bench_websocket.py)
MAX_HEAD_BYTES = 16 * 1024  # an upgrade request's or answer's head, as h11 allows
MAX_REFUSAL_BYTES = 64 * 1024  # a refused upgrade's whole answer, as the connector reads it
MAX_PINGS_PER_SECOND = 10
MAX_TINY_FRAMES, TINY_FRAME_BYTES = 1000, 64  # a second's frames beyond this many must average this much
FRAME_CHECK_EVERY = 256


class WebSocketRejected(Exception):
    """The relay answered the upgrade with an HTTP status instead (401, 503 with Retry-After, …)."""

    def __init__(self, status_code: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code
        self.headers = headers
        self.body = body


class HandshakeFailed(Exception):
    """The peer's answer was not a WebSocket upgrade (or it left during it)."""


class WebSocketStream(trio.abc.Stream):
    """Binary WebSocket messages in and out as a byte stream, over ``transport`` after the upgrade.

    A text message, a message over MAX_MESSAGE_BYTES or a broken frame is a protocol violation: the
    stream reports a broken resource (so the HTTP/2 session above tears down) and :meth:`aclose` closes
    the WebSocket with the matching code (1003, 1009, 1002). The peer's Close ends the stream (b"").
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        connection: Connection,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        received: bytes = b"",
    ) -> None:
        self.transport = transport
        self.headers = headers or []  # the other side's handshake headers (lower-case names)
        self._conn = connection
        self._send_lock = trio.StrictFIFOLock()  # the reader answers PINGs while the writer sends
        self._pending: list[bytes] = []
        self._message_bytes = 0
        self._close_code: int = CloseReason.NORMAL_CLOSURE
        self._ended = False  # the peer's Close or EOF arrived (or a violation ended the stream)
        self._closed = False
        # Frames, their bytes and PINGs in the current one-second window (flood limits).
        self._window, self._frames, self._frame_bytes, self._pings = -math.inf, 0, 0, 0
        # Bytes that came with the handshake (the peer's first frames) wait in wsproto's buffer.
        self._unread: bytes | None = received

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        async with self._send_lock:
            try:
                for start in range(0, len(view), MAX_BATCH_BYTES):
                    piece = view[start : start + MAX_BATCH_BYTES]
                    # The session's writer hands over batches as bytes: then no copy before framing.
                    payload = data if len(piece) == len(data) and isinstance(data, bytes) else bytes(piece)
                    await self.transport.send_all(self._conn.send(BytesMessage(data=payload)))
            except LocalProtocolError as exc:  # the WebSocket is closing
                raise trio.BrokenResourceError(f"tunnel WebSocket closed: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._pending:
            if self._ended:
                return b""
            if self._unread is not None:  # the first read: what came with the handshake (maybe b"")
                data, self._unread = self._unread, None
            else:
                data = bytes(await self.transport.receive_some(RECEIVE_BYTES))
                if not data:
                    self._ended = True
                    return b""
            await self._absorb(data)
        if len(self._pending) == 1:
            data = self._pending.pop()
        else:
            data = b"".join(self._pending)
            self._pending.clear()
        if max_bytes is not None and len(data) > max_bytes:
            data, rest = data[:max_bytes], data[max_bytes:]
            self._pending.append(rest)
        return data

    async def _absorb(self, data: bytes) -> None:
        self._conn.receive_data(data)
        now = trio.current_time()
        if now - self._window >= 1.0:
            self._window, self._frames, self._frame_bytes, self._pings = now, 0, 0, 0
        for count, event in enumerate(self._conn.events(), 1):
            # Each frame costs a few µs whatever it carries: tiny frames must neither cost the relay a core
            # nor, a read full of them, hold its event loop. Our own writer sends one frame per batch.
            self._frames += 1
            if (
                self._frames % FRAME_CHECK_EVERY == 0
                and self._frames > MAX_TINY_FRAMES
                and self._frame_bytes < self._frames * TINY_FRAME_BYTES
            ):
                self._violation(
                    CloseReason.POLICY_VIOLATION,
                    f"more than {MAX_TINY_FRAMES} WebSocket frames a second averaging under "
                    f"{TINY_FRAME_BYTES} bytes",
                )
            if count % FRAME_CHECK_EVERY == 0:
                await trio.lowlevel.checkpoint()
            if isinstance(event, BytesMessage):
                self._frame_bytes += len(event.data)
                self._message_bytes += len(event.data)
                if self._message_bytes > MAX_MESSAGE_BYTES:
                    self._violation(
                        CloseReason.MESSAGE_TOO_BIG,
                        f"WebSocket message over {MAX_MESSAGE_BYTES} bytes (the tunnel's largest)",
                    )
                if event.message_finished:
                    self._message_bytes = 0
                if event.data:
                    self._pending.append(bytes(event.data))
            elif isinstance(event, TextMessage):
                self._violation(CloseReason.UNSUPPORTED_DATA, "text message on the tunnel (binary only)")
            elif isinstance(event, Ping):
                # Neither end sends WebSocket PINGs (liveness is HTTP/2's): a proxy's occasional one is
                # answered, a flood ends the session like an HTTP/2 PING flood does.
                self._pings += 1
                if self._pings > MAX_PINGS_PER_SECOND:
                    self._violation(
                        CloseReason.POLICY_VIOLATION,
                        f"more than {MAX_PINGS_PER_SECOND} WebSocket PINGs a second",
                    )
                async with self._send_lock:
                    await self.transport.send_all(self._conn.send(event.response()))
            elif isinstance(event, CloseConnection):
                # The peer's Close (answered in aclose), or wsproto's report of a broken frame.
                self._ended = True
                if self._conn.state is ConnectionState.OPEN:
                    self._violation(event.code, f"WebSocket protocol error: {event.reason}")
                return

    def _violation(self, code: int, reason: str) -> None:
        self._ended = True
        self._pending.clear()
        self._close_code = code
        raise trio.BrokenResourceError(reason)

    async def aclose(self) -> None:
        """The closing handshake (Close, then the peer's Close, bounded by the caller), then the transport
        closes regardless."""
        if self._closed:
            return
        self._closed = True
        try:
            state = self._conn.state
            if state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                async with self._send_lock:
                    await self.transport.send_all(self._conn.send(CloseConnection(code=self._close_code)))
            while self._conn.state is ConnectionState.LOCAL_CLOSING:  # wait for the peer's Close
                data = bytes(await self.transport.receive_some(RECEIVE_BYTES))
                if not data:
                    break
                self._conn.receive_data(data)
                for _ in self._conn.events():
                    pass  # data after our Close is dropped; the peer's Close moves the state on
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, LocalProtocolError):
            pass  # the peer went first
        finally:
            await trio.aclose_forcefully(self.transport)


async def connect(
    transport: trio.abc.Stream,
    host: str,
    resource: str,
    *,
    subprotocols: list[str],
    headers: list[tuple[bytes, bytes]],
) -> WebSocketStream:
    """The client's upgrade on ``transport``: a WebSocketStream, or WebSocketRejected (an HTTP answer)
    or HandshakeFailed. The caller bounds it in time; the answer is bounded to MAX_REFUSAL_BYTES."""
    handshake = H11Handshake(ConnectionType.CLIENT)
    await transport.send_all(
        handshake.send(Request(host=host, target=resource, subprotocols=subprotocols, extra_headers=headers))
    )
    received = 0
    refusal: RejectConnection | None = None
    body = b""
    while True:
        data = bytes(await transport.receive_some(RECEIVE_BYTES))
        if not data:  # the peer closed: the end of a refusal's body, or of the attempt
            if refusal is not None:
                raise WebSocketRejected(refusal.status_code, list(refusal.headers), body)
            raise HandshakeFailed("the connection closed during the WebSocket upgrade")
        received += len(data)
        try:
            handshake.receive_data(data)
            events = list(handshake.events())
        except RemoteProtocolError as exc:
            raise HandshakeFailed(f"not a WebSocket upgrade answer: {exc}") from exc
        except Exception as exc:  # wsproto decodes what it is given (a header that is not ASCII)
            raise HandshakeFailed(f"not a WebSocket upgrade answer: {type(exc).__name__}: {exc}") from exc
        for event in events:
            if isinstance(event, AcceptConnection):
                assert handshake.connection is not None
                if event.subprotocol not in subprotocols:
                    raise HandshakeFailed(f"the relay accepted subprotocol {event.subprotocol!r}")
                return WebSocketStream(transport, handshake.connection, headers=event.extra_headers)
            if isinstance(event, RejectConnection):
                if 100 <= event.status_code < 200:
                    continue  # 100 Continue, 103 Early Hints: the answer is still to come
                refusal = event
                if not event.has_body:
                    raise WebSocketRejected(event.status_code, list(event.headers), b"")
            elif isinstance(event, RejectData) and refusal is not None:
                body += event.data
                if event.body_finished:
                    raise WebSocketRejected(refusal.status_code, list(refusal.headers), body)
        if received > MAX_REFUSAL_BYTES:  # and no 101 in it: a refusal keeps what it said so far
            if refusal is not None:
                raise WebSocketRejected(refusal.status_code, list(refusal.headers), body[:MAX_REFUSAL_BYTES])
            raise HandshakeFailed(f"the upgrade's answer exceeds {MAX_REFUSAL_BYTES} bytes")


@dataclass
class UpgradeRequest:
    """A connector's upgrade request, read and checked; :meth:`accept` makes the WebSocket."""

    path: str
    headers: dict[str, str]  # lower-case names; latin-1 values
    subprotocols: list[str]
    _handshake: H11Handshake | None
    _rest: bytes  # what arrived after the head

    @classmethod
    def parse(cls, head: bytes, rest: bytes = b"") -> UpgradeRequest:
        """Raises NotAnUpgrade with the answer to give."""
        handshake = H11Handshake(ConnectionType.SERVER)
        try:
            handshake.receive_data(head)
            events = list(handshake.events())
        except RemoteProtocolError as exc:
            hint = exc.event_hint
            status = hint.status_code if isinstance(hint, RejectConnection) else 400
            extra = list(hint.headers) if isinstance(hint, RejectConnection) else []
            raise NotAnUpgrade(status, extra, f"not a WebSocket upgrade: {exc}") from exc
        except Exception as exc:  # h11 and wsproto decode what they are given (a Host that is not IDNA)
            raise NotAnUpgrade(400, [], f"not a WebSocket upgrade: {type(exc).__name__}") from exc
        request = next((e for e in events if isinstance(e, Request)), None)
        if request is None:  # the head ended without a whole request (cannot happen after a blank line)
            raise NotAnUpgrade(400, [], "not a WebSocket upgrade: incomplete request")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.extra_headers}
        return cls(request.target, headers, list(request.subprotocols), handshake, rest)

    def accept(self, subprotocol: str, headers: list[tuple[bytes, bytes]]) -> tuple[bytes, Connection]:
        """The 101 answer to send, and the WebSocket connection that follows it."""
        handshake, self._handshake = self._handshake, None  # a session lasts: keep no HTTP state for it
        assert handshake is not None, "accepted twice"
        answer = handshake.send(AcceptConnection(subprotocol=subprotocol, extra_headers=headers))
        assert handshake.connection is not None
        return answer, handshake.connection

    async def upgrade(
        self, transport: trio.abc.Stream, subprotocol: str, headers: list[tuple[bytes, bytes]]
    ) -> WebSocketStream:
        answer, connection = self.accept(subprotocol, headers)
        rest, self._rest = self._rest, b""
        await transport.send_all(answer)
        return WebSocketStream(transport, connection, received=rest)


class NotAnUpgrade(Exception):
    """A request the relay answers with ``status`` (400, or 426 for another WebSocket version)."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], message: str) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
