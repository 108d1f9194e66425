"""A WebSocket seen as a byte stream.

The tunnel carries one continuous HTTP/2 byte stream inside WebSocket binary messages; message boundaries
mean nothing (DESIGN §4). Hiding the WebSocket behind :class:`trio.abc.Stream` lets the HTTP/2 session run
unchanged over trio-websocket, over ``trio.testing.memory_stream_pair`` in tests, or over another WebSocket
library later.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import cast

import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection

_log = logging.getLogger("printrelay.tunnel.websocket")

SUBPROTOCOL = "printrelay.h2.v1"
TUNNEL_PATH = "/v1/tunnel"
# The relay names itself on the upgrade (101) answer: which replica answered, and how many are alive, so a
# connector keeps sessions to distinct replicas, and one session to a relay that runs alone.
REPLICA_HEADER = "x-printrelay-replica"
REPLICAS_HEADER = "x-printrelay-replicas"

# Frames are batched into messages of at most this size (DESIGN §4); the receive side accepts a little more
# so that a full batch plus framing never trips trio-websocket's max_message_size.
MAX_BATCH_BYTES = 256 * 1024
MAX_MESSAGE_BYTES = 2 * MAX_BATCH_BYTES


class WebSocketStream(trio.abc.Stream):
    """Binary WebSocket messages in and out as a byte stream.

    A text message is a protocol violation: the WebSocket is closed with 1003 (unsupported data) and the
    stream reports a broken resource, so the HTTP/2 session above tears down.
    """

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._pending = b""

    @property
    def websocket(self) -> WebSocketConnection:
        return self._ws

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            if isinstance(data, bytes) and len(data) <= MAX_BATCH_BYTES:
                await self._ws.send_message(data)  # the common case: the session's writer sends batches
                return
            view = memoryview(data)
            for start in range(0, len(view), MAX_BATCH_BYTES):
                await self._ws.send_message(bytes(view[start : start + MAX_BATCH_BYTES]))
        except ConnectionClosed as exc:
            raise trio.BrokenResourceError("tunnel WebSocket closed") from exc

    async def wait_send_all_might_not_block(self) -> None:
        return None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._pending:
            try:
                message = await self._ws.get_message()
            except ConnectionClosed:
                return b""
            if isinstance(message, str):
                await self._ws.aclose(code=1003, reason="tunnel carries binary messages only")
                raise trio.BrokenResourceError("text message on the tunnel")
            self._pending = message
        if max_bytes is None or max_bytes >= len(self._pending):
            data, self._pending = self._pending, b""
        else:
            data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return data

    async def aclose(self) -> None:
        await self._ws.aclose()


class ReaderTasks:
    """A stand-in for the nursery that trio-websocket's ``wrap_server_stream`` / ``wrap_client_stream``
    start their background reader in, so that whatever that reader raises ends this connection only.

    trio-websocket's reader task lets some peer-caused errors escape: a client that sends a plain HTTP
    request and resets the connection makes the reader's own 400 answer fail with ``ConnectionClosed``,
    raised out of the reader into the nursery it runs in. With ``serve_websocket`` that nursery is the
    listener's, so 50 such connections stopped the relay. Here the reader's end is contained and
    logged, and whoever waits on the connection learns of it (``on_finished``). Only a refused client
    handshake (``HandshakeError``, e.g. ``ConnectionRejected`` carrying a 401 or 503) still propagates:
    that is the library's way of reporting it to the dialler.
    """

    def __init__(self, nursery: trio.Nursery, name: str) -> None:
        self._nursery = nursery
        self._name = name
        self._on_finished: list[Callable[[], object]] = []
        self.finished = False

    def nursery(self) -> trio.Nursery:
        # Duck-typed: the wrap functions only call start_soon on what they are given.
        return cast(trio.Nursery, self)

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object, name: object = None) -> None:
        self._nursery.start_soon(self._run, fn, args, name=name)

    def on_finished(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` when the reader ends (at once if it already has)."""
        if self.finished:
            callback()
        else:
            self._on_finished.append(callback)

    async def _run(self, fn: Callable[..., Awaitable[object]], args: tuple[object, ...]) -> None:
        try:
            await fn(*args)
        except HandshakeError:
            raise  # a client's refused upgrade: how trio-websocket reports it, on purpose (never a server's)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            _log.debug("%s: WebSocket reader ended: %r", self._name, exc)
        except Exception:
            # Not the peer's doing as far as we know, but still no reason to end anything but this connection.
            _log.warning("%s: WebSocket reader failed", self._name, exc_info=True)
        finally:
            self.finished = True
            callbacks, self._on_finished = self._on_finished, []
            for callback in callbacks:
                callback()
