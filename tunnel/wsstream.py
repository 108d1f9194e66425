"""A WebSocket seen as a byte stream.

The tunnel carries one continuous HTTP/2 byte stream inside WebSocket binary messages; message boundaries
mean nothing (DESIGN §4). Hiding the WebSocket behind :class:`trio.abc.Stream` lets the HTTP/2 session run
unchanged over trio-websocket, over ``trio.testing.memory_stream_pair`` in tests, or over another WebSocket
library later.
"""

from __future__ import annotations

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

SUBPROTOCOL = "printrelay.h2.v1"
TUNNEL_PATH = "/v1/tunnel"

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
