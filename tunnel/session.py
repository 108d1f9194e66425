"""One HTTP/2 session over a byte stream: the thin trio layer around :class:`TunnelProtocol`.

An :class:`H2Session` owns everything that runs for it — its reader, its writer (which also sends the
PINGs) and the handlers of the streams the peer opens — in one nursery. Closing the session (or losing the
transport) cancels them all; every stream still open then fails with :class:`StreamClosed`, so callers can
put a job back in the queue.

Flow control is end to end: a DATA frame is acknowledged (WINDOW_UPDATE) only when the consumer of the
stream asks for the next chunk, i.e. after it has handed the previous one on — to a printer, on the
connector. A slow printer therefore slows the relay's sender, and neither side buffers more than the
windows allow.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import struct
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import h2.errors
import h2.events
import h2.exceptions
import trio

from service.signal import Signal
from tunnel.protocol import ProtocolViolation, TunnelProtocol, TunnelSettings
from tunnel.wsstream import MAX_BATCH_BYTES

log = logging.getLogger("printrelay.tunnel")

Headers = list[tuple[str, str]]
StreamHandler = Callable[["H2Stream"], Awaitable[None]]
ErrorCodes = h2.errors.ErrorCodes


class SessionClosed(Exception):
    """The session is gone (transport lost, GOAWAY, dead peer)."""


class StreamClosed(Exception):
    """The stream was reset by the peer or ended with its session."""

    def __init__(self, message: str, *, error_code: int | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code


@dataclass
class SessionStats:
    bytes_in: int = 0
    bytes_out: int = 0
    flow_stalls: int = 0
    pings_sent: int = 0
    last_rtt: float | None = None


class H2Stream:
    """One request/response exchange. The client side opens it with :meth:`H2Session.open_stream`; the
    server side gets it in its handler."""

    def __init__(self, session: H2Session, stream_id: int, headers: Headers) -> None:
        self._session = session
        self.stream_id = stream_id
        self.request_headers = headers
        self.response_headers: Headers | None = None
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._unacked = 0
        self._window_opened = False
        self._ended = False  # the peer ended its side (END_STREAM received)
        self._cut = False  # a reset dropped body data nobody had read: the body is not whole
        self._sent_end = False  # we ended ours (END_STREAM sent)
        self._closed_reason: str | None = None
        self._reset_code: int | None = None
        self._changed = Signal()

    @property
    def session(self) -> H2Session:
        """The session this stream belongs to."""
        return self._session

    # --- request metadata (server side) ---------------------------------------------------------------

    def header(self, name: str, headers: Headers | None = None) -> str | None:
        for key, value in headers if headers is not None else self.request_headers:
            if key == name:
                return value
        return None

    @property
    def method(self) -> str:
        return self.header(":method") or ""

    @property
    def path(self) -> str:
        return self.header(":path") or ""

    @property
    def status(self) -> int:
        if self.response_headers is None:
            raise StreamClosed("no response yet")
        return int(self.header(":status", self.response_headers) or 0)

    # --- receiving ----------------------------------------------------------------------------------

    async def wait_closed(self) -> int | None:
        """Wait until the stream is reset or its session ends; the RST_STREAM error code, if any."""
        while self._closed_reason is None:
            await self._changed.wait()
        return self._reset_code

    async def receive_response(self) -> Headers:
        """Wait for the response headers (client side)."""
        while self.response_headers is None:
            self._raise_if_closed()
            await self._changed.wait()
        return self.response_headers

    async def iter_data(self, *, open_window: bool = True) -> AsyncGenerator[bytes, None]:
        """Yield the body as it arrives; each chunk is acknowledged when the next one is asked for.

        The stream starts with the small unread_stream_window; reading it opens the full stream_window,
        unless ``open_window`` is False: a body of small messages (a job's status lines) needs no more, and
        each stream is then one WINDOW_UPDATE lighter on both sides.
        """
        if open_window:
            self._session._open_window(self)
        while True:
            self._acknowledge()
            while not self._chunks:
                if self._ended and not self._cut:
                    return
                self._raise_if_closed()
                await self._changed.wait()
            data, flow = self._chunks.popleft()
            self._unacked += flow
            if data:
                yield data

    async def read_body(self, limit: int) -> bytes:
        """The whole body, for small control messages; a body over ``limit`` resets the stream."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.iter_data():
            size += len(chunk)
            if size > limit:
                self.reset(ErrorCodes.REFUSED_STREAM)
                raise StreamClosed(f"body exceeds {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def _acknowledge(self) -> None:
        if self._unacked:
            self._session._acknowledge(self.stream_id, self._unacked)
            self._unacked = 0

    def _raise_if_closed(self) -> None:
        if self._closed_reason is not None:
            raise StreamClosed(self._closed_reason, error_code=self._reset_code)

    # --- sending ------------------------------------------------------------------------------------

    async def send_response(
        self, status: int, headers: Sequence[tuple[str, str]] = (), *, end_stream: bool = False
    ) -> None:
        self._raise_if_closed()
        self._session._send_headers(
            self.stream_id, [(":status", str(status)), *headers], end_stream=end_stream
        )
        await self._session._wait_output_room()

    async def send_data(self, data: bytes | bytearray | memoryview, *, end_stream: bool = False) -> None:
        """Send ``data``, waiting for flow-control window and for the writer to catch up."""
        view = memoryview(data)
        session = self._session
        while True:
            self._raise_if_closed()
            if not view:
                if end_stream:
                    session._end_stream(self.stream_id)
                return
            window = session._send_window(self.stream_id)
            if window <= 0:
                session.stats.flow_stalls += 1
                await session._flow_changed.wait()
                continue
            size = min(len(view), window)
            last = end_stream and size == len(view)
            # Whole: no copy (h2 only reads it); part of it: a copy that h2 may keep.
            piece = data if size == len(data) and isinstance(data, bytes) else bytes(view[:size])
            session._send_data(self.stream_id, piece, end_stream=last)
            view = view[size:]
            await session._wait_output_room()
            if last:
                return

    async def end(self) -> None:
        self._raise_if_closed()
        self._session._end_stream(self.stream_id)

    def reset(self, error_code: int = ErrorCodes.CANCEL) -> None:
        """Abandon the stream: tell the peer (RST_STREAM) and return its buffered window."""
        if self._closed_reason is None:
            self._session._reset_stream(self.stream_id, error_code)
            self._close(f"reset locally ({ErrorCodes(error_code).name})", error_code)

    # --- called by the session ----------------------------------------------------------------------

    def _close(self, reason: str, error_code: int | None = None, *, keep_data: bool = False) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
            self._reset_code = error_code
        if not keep_data:
            # Data nobody will read still occupies the connection window: give it back.
            leftover = self._unacked + sum(flow for _, flow in self._chunks)
            # A reset after END_STREAM (a cancel while the body waited unread) must not read as a short
            # body that ended normally: the consumer would take a cancel for a truncated payload.
            self._cut = self._cut or any(data for data, _ in self._chunks)
            self._chunks.clear()
            self._unacked = 0
            if leftover:
                self._session._acknowledge(self.stream_id, leftover)
        self._changed.fire()


class H2Session:
    """An HTTP/2 connection over ``transport``; run it with :meth:`run` inside a nursery."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        *,
        client_side: bool,
        settings: TunnelSettings | None = None,
        handler: StreamHandler | None = None,
        name: str = "tunnel",
    ) -> None:
        self.settings = settings or TunnelSettings()
        self.name = name
        self.stats = SessionStats()
        self._transport = transport
        self._client_side = client_side
        self._proto = TunnelProtocol(self.settings, client_side=client_side)
        self._conn = self._proto.conn
        self._handler = handler
        self._streams: dict[int, H2Stream] = {}
        self._out = bytearray()
        self._out_wanted = Signal()
        self._out_drained = Signal()
        self._writing = False  # the writer is sending a chunk it took from _out
        self._flow_changed = Signal()
        self._nursery: trio.Nursery | None = None
        self._closed: str | None = None
        self._goaway_received = False
        self._last_received = trio.current_time()
        self._pings_sent: dict[bytes, float] = {}
        self.started = trio.Event()
        self.finished = trio.Event()

    # --- public ---------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._closed is None and not self._goaway_received

    @property
    def close_reason(self) -> str | None:
        return self._closed

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the session until the transport ends, the peer dies, or :meth:`close` is called."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._proto.initiate()
                self._flush()
                nursery.start_soon(self._writer)  # which also pings (see _keepalive)
                self.started.set()
                task_status.started()
                await self._reader()
                nursery.cancel_scope.cancel()
        finally:
            self._shutdown(self._closed or "session ended")
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self._transport.aclose()
            self.finished.set()

    async def open_stream(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        end_stream: bool = False,
    ) -> H2Stream:
        """Open a stream (client side) and send its request headers."""
        if not self.is_open:
            raise SessionClosed(self._closed or "session closed")
        while self._conn.open_outbound_streams >= self._conn.remote_settings.max_concurrent_streams:
            await self._flow_changed.wait()
            if not self.is_open:
                raise SessionClosed(self._closed or "session closed")
        stream_id = self._conn.get_next_available_stream_id()
        request = [
            (":method", method),
            (":scheme", "https"),
            (":authority", "connector"),
            (":path", path),
            *headers,
        ]
        stream = H2Stream(self, stream_id, request)
        self._streams[stream_id] = stream
        self._send_headers(stream_id, request, end_stream=end_stream)
        await self._wait_output_room()
        return stream

    def close(self, reason: str, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """Send GOAWAY and end the session now; open streams fail with StreamClosed."""
        if self._closed is not None:
            return
        self._closed = reason
        try:
            self._conn.close_connection(error_code=error_code, additional_data=reason.encode()[:256])
            self._out += self._conn.data_to_send()
            self._out_wanted.fire()
        except h2.exceptions.ProtocolError:
            pass
        if self._nursery is not None:
            self._nursery.start_soon(self._final_flush)

    async def _final_flush(self) -> None:
        # Best effort: give what is queued (the last statuses, then the GOAWAY) a moment to leave, then
        # tear the session down. The writer sends it: a second sender racing a send in progress could cut
        # the bytes before it off (the GOAWAY leaving while a status was still being written).
        with trio.move_on_after(1):
            while self._out or self._writing:
                await self._out_drained.wait()
        self._out.clear()
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    # --- tasks ----------------------------------------------------------------------------------

    async def _reader(self) -> None:
        while self._closed is None:
            try:
                data = await self._transport.receive_some(MAX_BATCH_BYTES * 2)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._closed = f"transport lost: {exc}"
                return
            if not data:
                self._closed = self._closed or "peer closed the tunnel"
                return
            self._last_received = trio.current_time()
            self.stats.bytes_in += len(data)
            try:
                events = self._proto.receive_data(bytes(data), trio.current_time())
            except ProtocolViolation as exc:
                log.warning("%s: closing session: %s", self.name, exc.reason)
                self.close(exc.reason, exc.error_code)
                # Returning would cancel the session before _final_flush sent the GOAWAY that tells the
                # peer why; _final_flush ends the session (within a second) instead.
                await trio.sleep_forever()
            for event in events:
                self._dispatch(event)
            self._flush()

    async def _writer(self) -> None:
        last_ping = trio.current_time()
        while True:
            while not self._out:
                self._out_drained.fire()
                # No PINGs once closing: then it only sends what is queued.
                with trio.move_on_at(self._next_ping(last_ping) if self._closed is None else math.inf):
                    await self._out_wanted.wait()
                last_ping = self._keepalive(last_ping)
            size = min(len(self._out), MAX_BATCH_BYTES)
            chunk = bytes(self._out[:size])
            del self._out[:size]
            self._writing = True
            try:
                with trio.fail_after(self.settings.send_timeout):
                    await self._transport.send_all(chunk)
            except trio.TooSlowError:
                self._closed = self._closed or f"peer did not read for {self.settings.send_timeout:g} s"
                assert self._nursery is not None
                self._nursery.cancel_scope.cancel()
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._closed = self._closed or f"transport lost: {exc}"
                assert self._nursery is not None
                self._nursery.cancel_scope.cancel()
                return
            self._writing = False
            self.stats.bytes_out += size
            if len(self._out) < self.settings.output_high_water:
                self._out_drained.fire()
            last_ping = self._keepalive(last_ping)

    def _next_ping(self, last_ping: float) -> float:
        interval = self.settings.ping_interval
        if not self._client_side or self.stats.last_rtt is None:
            return last_ping + interval
        # The relay (the client side, with thousands of sessions) hears its connectors' PINGs every
        # ping_interval, which already prove they are alive: it pings only when one goes quiet, and
        # once per rtt_interval for the round-trip time. Idle tunnels then cost it half the frames.
        # Quiet means silent for 1.5 intervals, so a peer pinging on its own schedule never looks quiet.
        quiet_ping = max(self._last_received, last_ping) + 1.5 * interval
        return min(quiet_ping, last_ping + self.settings.rtt_interval)

    def _keepalive(self, last_ping: float) -> float:
        """PING the peer when due, or end a session whose peer stayed silent for dead_after; returns when
        the last PING went. The writer calls it whenever it wakes (and at the next PING's time at the
        latest): one task less per session than a pinger of its own, and a relay holds thousands."""
        now = trio.current_time()
        if self._closed is not None or now < self._next_ping(last_ping):
            # Closing (GOAWAY queued, the last bytes leaving): h2 refuses a PING now. Or the peer spoke.
            return last_ping
        silent = now - self._last_received
        if silent >= self.settings.dead_after:
            log.warning("%s: peer silent for %.0f s, session is dead", self.name, silent)
            self._closed = f"peer silent for {silent:.0f} s (dead_after={self.settings.dead_after:g})"
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()
            return now
        payload = struct.pack(">d", now)
        self._pings_sent[payload] = now
        if len(self._pings_sent) > 8:  # unanswered pings: keep only the newest few
            self._pings_sent.pop(next(iter(self._pings_sent)))
        self._conn.ping(payload)
        self._flush()
        self.stats.pings_sent += 1
        return now

    # --- events ---------------------------------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.response_headers = list(event.headers)  # type: ignore[arg-type]
                stream._changed.fire()
        elif isinstance(event, h2.events.DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None or stream._closed_reason is not None:
                # Nobody will read it; give the window back at once.
                self._acknowledge(event.stream_id, event.flow_controlled_length)
            else:
                stream._chunks.append((event.data, event.flow_controlled_length))
                stream._changed.fire()
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._ended = True
                stream._changed.fire()
                self._maybe_forget(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self._streams.pop(event.stream_id, None)
            if stream is not None:
                name = _code_name(event.error_code)
                # RST_STREAM(NO_ERROR) after a complete response only says "stop sending" (RFC 9113
                # §8.1): the response stays readable.
                complete = event.error_code == ErrorCodes.NO_ERROR and stream._ended
                stream._close(f"stream reset by peer ({name})", event.error_code, keep_data=complete)
            self._flow_changed.fire()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._flow_changed.fire()
        elif isinstance(event, h2.events.PingAckReceived):
            sent = self._pings_sent.pop(event.ping_data, None)
            if sent is not None:
                self.stats.last_rtt = trio.current_time() - sent
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event)

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        headers: Headers = list(event.headers)  # type: ignore[arg-type]
        stream = H2Stream(self, event.stream_id, headers)
        if event.stream_ended is not None:
            stream._ended = True
        self._streams[event.stream_id] = stream
        if self._handler is None or self._nursery is None:
            stream.reset(ErrorCodes.REFUSED_STREAM)
            return
        self._nursery.start_soon(self._run_handler, stream)

    async def _run_handler(self, stream: H2Stream) -> None:
        assert self._handler is not None
        try:
            await self._handler(stream)
        except StreamClosed as exc:
            log.debug("%s: stream %d closed: %s", self.name, stream.stream_id, exc)
        except SessionClosed:
            pass
        except Exception:
            log.exception("%s: handler for %s failed", self.name, stream.path)
            stream.reset(ErrorCodes.INTERNAL_ERROR)
        finally:
            self._maybe_forget(stream, handler_done=True)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        # h2 treats any GOAWAY as the end of the connection (it refuses to send afterwards), so a graceful
        # drain is an application message (POST /v1/drain), and GOAWAY here means: closed now.
        self._goaway_received = True
        self._closed = self._closed or f"peer sent GOAWAY ({_code_name(event.error_code)})"
        for stream in list(self._streams.values()):
            stream._close(self._closed, keep_data=stream._ended)
        self._streams.clear()
        self._flow_changed.fire()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _maybe_forget(self, stream: H2Stream, *, handler_done: bool = False) -> None:
        """Drop a finished stream from the table once both directions are closed (our own record of the
        stream's state, kept beside h2's: h2 offers no public way to ask it)."""
        closed = stream._closed_reason is not None or (stream._sent_end and stream._ended)
        if closed and (handler_done or self._client_side):
            self._streams.pop(stream.stream_id, None)

    def _ended_by_us(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream._sent_end = True
            self._maybe_forget(stream)

    def _shutdown(self, reason: str) -> None:
        for stream in list(self._streams.values()):
            # A body that arrived whole stays readable: its consumer may still be handing it on.
            stream._close(f"session closed: {reason}", keep_data=stream._ended)
        self._streams.clear()
        self._flow_changed.fire()
        self._out_drained.fire()

    # --- h2 operations for streams ----------------------------------------------------------------

    def _send_headers(self, stream_id: int, headers: Headers, *, end_stream: bool) -> None:
        self._guard(lambda: self._conn.send_headers(stream_id, headers, end_stream=end_stream))
        if end_stream:
            self._ended_by_us(stream_id)

    def _send_data(self, stream_id: int, data: bytes, *, end_stream: bool) -> None:
        frame = self._conn.max_outbound_frame_size
        for start in range(0, len(data), frame):
            piece = data[start : start + frame]
            last = end_stream and start + frame >= len(data)
            self._guard(functools.partial(self._conn.send_data, stream_id, piece, end_stream=last))
        if end_stream:
            self._ended_by_us(stream_id)

    def _end_stream(self, stream_id: int) -> None:
        self._guard(lambda: self._conn.end_stream(stream_id))
        self._ended_by_us(stream_id)

    def _reset_stream(self, stream_id: int, error_code: int) -> None:
        # Already closed: nothing to tell the peer.
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._conn.reset_stream(stream_id, error_code=error_code)
        self._streams.pop(stream_id, None)
        self._flush()

    def _send_window(self, stream_id: int) -> int:
        try:
            return int(self._conn.local_flow_control_window(stream_id))
        except h2.exceptions.ProtocolError as exc:
            raise StreamClosed(f"stream {stream_id} closed: {exc}") from exc

    def _open_window(self, stream: H2Stream) -> None:
        """Raise a stream's receive window from unread_stream_window to stream_window, once."""
        if stream._window_opened or self._closed is not None:
            return
        stream._window_opened = True
        increment = self.settings.stream_window - min(
            self.settings.unread_stream_window, self.settings.stream_window
        )
        if increment <= 0:
            return
        try:
            self._conn.increment_flow_control_window(increment, stream_id=stream.stream_id)
        except h2.exceptions.ProtocolError:
            return  # the stream is already closed: no window to open
        self._flush()

    def _acknowledge(self, stream_id: int, size: int) -> None:
        if self._closed is not None:
            return
        try:
            self._conn.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            return
        self._flush()

    def _guard(self, operation: Callable[[], None]) -> None:
        if self._closed is not None:
            raise SessionClosed(self._closed)
        try:
            operation()
        except h2.exceptions.StreamClosedError as exc:
            raise StreamClosed(f"stream closed: {exc}") from exc
        except h2.exceptions.ProtocolError as exc:
            raise StreamClosed(f"HTTP/2 refused the operation: {exc}") from exc
        self._flush()

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data:
            self._out += data
            self._out_wanted.fire()
            if len(self._out) > self.settings.max_pending_output and self._closed is None:
                self.close(
                    f"peer is not reading: {len(self._out)} bytes pending exceed "
                    f"max_pending_output={self.settings.max_pending_output}",
                    ErrorCodes.ENHANCE_YOUR_CALM,
                )

    async def _wait_output_room(self) -> None:
        while len(self._out) >= self.settings.output_high_water:
            if self._closed is not None:
                raise SessionClosed(self._closed)
            await self._out_drained.wait()
        if self._closed is not None:
            raise SessionClosed(self._closed)


def _code_name(code: int | None) -> str:
    if code is None:
        return "no code"
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)
