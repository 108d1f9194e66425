"""The relay's public HTTP/1.1 server: h11 driven by a small trio loop with our own deadlines and limits.

Why our own loop: hypercorn's trio worker died from single crafted connections and anycorn leaked fds
and tasks under the same abuse, while h11 itself held every limit.

Shape of one connection (two tasks, both owned by the connection's nursery):

* the *pump* is the only reader of the socket. It appends bytes to a bounded inbox and, when the peer
  goes away, cancels the running handler. So a client that vanishes is noticed even while a handler
  streams a response or waits for events, and pipelined bytes behind a streamed response are buffered
  (bounded) instead of parked on by a second reader. EOF from the client counts as leaving (as in
  Go's net/http): HTTP clients do not half-close, and a handler must not outlive its client.
* the *connection task* moves inbox bytes into h11 only when h11 needs data, answers requests strictly
  in order, and is the only writer. Every wait it makes has a deadline from `HttpLimits`.
"""

from __future__ import annotations

import errno
import json
import logging
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import h11
import trio

from service.http.chunked import ChunkSizeError, ChunkSizes
from service.http.message import (
    BodyTimeout,
    ClientDisconnected,
    Handler,
    Headers,
    HTTPError,
    Request,
    RequestBody,
    Response,
    format_bytes,
)
from service.signal import Signal

__all__ = ["HttpLimits", "HttpServer"]

_log = logging.getLogger("printrelay.http")

# One receive; also the slack the inbox may overshoot its bound by.
RECEIVE_SIZE = 64 * 1024
# A handler that did not read the body: drain up to this much to keep the connection, else close.
DRAIN_LIMIT = 1024 * 1024
# After answering with `Connection: close` we half-close and discard input this long, so that bytes
# still in flight from the client do not turn our close into a RST that destroys the answer.
LINGER_TIMEOUT = 1.0
# Connections beyond max_connections get a canned 503; at most this many at once, the rest are closed.
MAX_REJECTING = 256
REJECT_TIMEOUT = 1.0
# Bound on the cleanup of an abandoned streamed response.
ACLOSE_TIMEOUT = 1.0

# Like trio.serve_listeners: running out of fds or buffers is not a reason to stop serving.
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 64 * 1024  # request line + headers (h11 max_incomplete_event_size) -> 431
    max_header_count: int = 100  # -> 431
    header_timeout: float = 10.0  # to receive a whole request head (slowloris) -> 408 and close
    keepalive_timeout: float = 30.0  # idle between requests -> close quietly
    body_chunk_timeout: float = 30.0  # max wait for the next body chunk -> 408
    body_min_rate: float = 1024.0  # bytes/s over the time spent waiting for them -> 408
    # body_min_rate applies after this much waiting (TCP slow start, clients that pause to compute).
    body_rate_grace: float = 10.0
    send_timeout: float = 60.0  # a write that stalls this long closes the connection
    max_connections: int = 10_000  # beyond: accept, answer 503, close
    max_requests_per_connection: int = 10_000


class HttpServer:
    """Serves `handler` over HTTP/1.1 until cancelled. Per-connection errors never reach the caller."""

    def __init__(
        self,
        handler: Handler,
        limits: HttpLimits = HttpLimits(),  # frozen: a shared default is safe
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_header: str = "printrelay",
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.ssl_context = ssl_context
        self.server_header = server_header
        self.open_connections = 0
        self._rejecting = 0

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on host:port (0 picks a free port, passed to `task_status.started`)."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound_port: int = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(self._serve_listeners, listeners)
            _log.info("HTTP server listening on %s:%d", host, bound_port)
            task_status.started(bound_port)

    async def serve_listeners(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serves on listeners made elsewhere (tests, systemd sockets); closes them when done."""
        await self._serve_listeners(listeners, task_status=task_status)

    async def _serve_listeners(
        self,
        listeners: Sequence[trio.abc.Listener[Any]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # Accept loops and connections share this one nursery: the server owns every task it runs.
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started()

    async def _accept_loop(self, listener: trio.abc.Listener[trio.abc.Stream], nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    _log.error("accept failed (%s), retrying in 100 ms", exc)
                    await trio.sleep(0.1)  # back off, as trio.serve_listeners does
                    continue
                if self.open_connections < self.limits.max_connections:
                    self.open_connections += 1
                    nursery.start_soon(self._run_connection, stream)
                elif self._rejecting < MAX_REJECTING:
                    self._rejecting += 1
                    nursery.start_soon(self._reject, stream)
                else:
                    await trio.aclose_forcefully(stream)

    def _wrap(self, stream: trio.abc.Stream) -> trio.abc.Stream:
        if self.ssl_context is None:
            return stream
        # https_compatible: HTTP clients often close without close_notify; that is not an error.
        return trio.SSLStream(stream, self.ssl_context, server_side=True, https_compatible=True)

    async def _run_connection(self, raw: trio.abc.Stream) -> None:
        stream, client = raw, _peer_address(raw)
        try:
            stream = self._wrap(raw)
            await _Connection(self, stream, client).run()
        except Exception:
            # A bug of ours, never the peer's fault (those end inside _Connection): log, live on.
            _log.exception("HTTP connection from %s failed", client)
        finally:
            self.open_connections -= 1
            await trio.aclose_forcefully(stream)

    async def _reject(self, raw: trio.abc.Stream) -> None:
        stream = raw
        try:
            stream = self._wrap(raw)
            with trio.move_on_after(REJECT_TIMEOUT):
                await stream.send_all(_OVERLOADED)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._rejecting -= 1
            await trio.aclose_forcefully(stream)


def _reason(status: int) -> bytes:
    """The standard reason phrase (``201 Created``): h11 sends none unless told, and people read them."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _canned_error(status: int, reason: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": message}, separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n{extra}"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


# Built once: an overloaded server should spend nothing on the connections it turns away.
_OVERLOADED = _canned_error(
    503, "Service Unavailable", "too many connections, retry later", "retry-after: 1\r\n"
)


def _peer_address(stream: trio.abc.Stream) -> tuple[str, int] | None:
    if isinstance(stream, trio.SocketStream):
        try:
            peer = stream.socket.getpeername()
        except OSError:
            return None
        if isinstance(peer, tuple):
            return str(peer[0]), int(peer[1])
    return None


class _ConnectionLost(Exception):
    """The peer is gone or a send stalled: stop serving this connection, quietly."""


class _Timeout(Exception):
    pass


class _Connection:
    def __init__(self, server: HttpServer, stream: trio.abc.Stream, client: tuple[str, int] | None) -> None:
        self._server = server
        self._limits = server.limits
        self._stream = stream
        self._client = client
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=server.limits.max_header_bytes)
        # Filled by the pump, moved into h11 when h11 needs data. Bounded: the pump stops reading
        # (TCP backpressure) while it holds this much, so pipelined floods cost no memory.
        self._inbox = bytearray()
        self._inbox_limit = max(self._limits.max_header_bytes, RECEIVE_SIZE)
        # How much h11 may still take while parsing a head (None: a body, fed in slices).
        self._feed_budget: int | None = None
        # A chunked body's sizes, checked as its bytes go to h11 (relay/http/chunked.py).
        self._chunk_sizes: ChunkSizes | None = None
        self._unchecked_body = b""  # body bytes h11 took along with the head, not yet checked
        self._slice = max(self._limits.max_header_bytes, 1)
        self._eof = False  # the peer closed or the receive side broke
        self._eof_fed = False
        self._discard = False  # lingering close: drop what arrives
        self._data_arrived = Signal()
        self._space_freed = Signal()
        self._handler_scope: trio.CancelScope | None = None
        self._reading_body = False
        self._requests = 0
        # For body_min_rate: bytes of the current body and seconds spent waiting for them.
        self._body_received = 0
        self._body_waited = 0.0
        self._close_after_response = False

    # ---- the pump: sole reader of the socket ---------------------------------------------------

    async def _pump(self) -> None:
        try:
            while True:
                while len(self._inbox) >= self._inbox_limit and not self._discard:
                    await self._space_freed.wait()
                data = await self._stream.receive_some(RECEIVE_SIZE)
                if not data:
                    break
                if not self._discard:
                    self._inbox += data
                self._data_arrived.fire()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self._eof = True
        self._data_arrived.fire()
        # The client is gone: a handler working for it is cancelled, except inside a body read,
        # which raises ClientDisconnected instead (and cancels once it returns).
        if self._handler_scope is not None and not self._reading_body:
            self._handler_scope.cancel()

    async def _next_event(self, deadline: float) -> Any:
        """The next h11 event, feeding h11 from the inbox. Raises _Timeout at `deadline`."""
        while True:
            event = self._h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self._inbox and self._feed_budget != 0:
                # h11 only bounds *incomplete* events: a 100 KiB head arriving in one piece
                # would pass. So h11 never holds more than max_header_bytes + 1 bytes while
                # parsing a head (beyond that it answers 431), and takes body bytes in slices
                # no bigger, which bounds the leftover a pipelined head starts from.
                n = self._slice if self._feed_budget is None else self._feed_budget
                data = bytes(self._inbox[:n])
                del self._inbox[: len(data)]
                if self._feed_budget is not None:
                    self._feed_budget -= len(data)  # what h11 took: a head may come in many reads
                elif self._chunk_sizes is not None:
                    self._chunk_sizes.feed(data)
                self._h11.receive_data(data)
                self._space_freed.fire()
            elif self._eof:
                if self._eof_fed:  # h11 should have reported the close; never spin
                    raise _ConnectionLost
                self._h11.receive_data(b"")
                self._eof_fed = True
            else:
                with trio.move_on_at(deadline):
                    await self._data_arrived.wait()
                    continue
                raise _Timeout

    # ---- the connection task -------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump)
            try:
                if await self._serve():
                    await self._linger()
            except _ConnectionLost:
                pass
            finally:
                nursery.cancel_scope.cancel()

    async def _serve(self) -> bool:
        """Answers requests in order. Returns whether the last thing we did was answer one."""
        while True:
            event = await self._receive_head()
            if event is None:
                return self._close_after_response  # set when an error answer went out
            self._requests += 1
            if not await self._respond(event):
                return True
            if self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE:
                return True  # e.g. the client asked for Connection: close
            self._h11.start_next_cycle()

    async def _receive_head(self) -> h11.Request | None:
        """The next request head, or None when the connection should end (after any error answer)."""
        now = trio.current_time()
        if self._requests == 0:
            # A new connection (and its TLS handshake) gets header_timeout for its first head.
            deadline = idle_deadline = now + self._limits.header_timeout
        else:
            idle_deadline = now + self._limits.keepalive_timeout
            deadline = 0.0
        leftover = len(self._h11.trailing_data[0])  # pipelined bytes from the last cycle
        while not (leftover or self._inbox or self._eof):
            with trio.move_on_at(idle_deadline):
                await self._data_arrived.wait()
                continue
            return None  # idle keep-alive connection: close quietly
        if not deadline:
            deadline = trio.current_time() + self._limits.header_timeout
        self._chunk_sizes, self._unchecked_body = None, b""

        self._feed_budget = max(0, self._limits.max_header_bytes + 1 - leftover)
        try:
            event = await self._next_event(deadline)
        except _Timeout:
            limit = self._limits.header_timeout
            await self._send_error(408, f"request head not received within header_timeout={limit}s")
            return None
        except h11.RemoteProtocolError as exc:
            await self._send_error(*self._head_error(exc))
            return None
        finally:
            self._feed_budget = None
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request), event
        if len(event.headers) > self._limits.max_header_count:
            await self._send_error(
                431,
                f"{len(event.headers)} header fields exceed max_header_count={self._limits.max_header_count}",
            )
            return None
        if any(name == b"transfer-encoding" for name, _ in event.headers) and any(
            name == b"content-length" for name, _ in event.headers
        ):
            # Both framings at once is how requests are smuggled past the proxy in front of us.
            await self._send_error(400, "request has both Content-Length and Transfer-Encoding")
            return None
        if any(name == b"transfer-encoding" for name, _ in event.headers):  # h11 took it: chunked
            self._chunk_sizes, self._unchecked_body = ChunkSizes(), self._h11.trailing_data[0]
        if not event.http_version.startswith(b"1."):
            version = event.http_version.decode("ascii", "replace")
            await self._send_error(505, f"HTTP/{version} is not supported, use HTTP/1.1")
            return None
        return event

    def _head_error(self, exc: h11.RemoteProtocolError) -> tuple[int, str]:
        if exc.error_status_hint == 431:
            limit = format_bytes(self._limits.max_header_bytes)
            head = self._h11.trailing_data[0]
            if b"\n" not in head:
                return 414, f"request line exceeds max_header_bytes={limit}"
            return 431, f"request head exceeds max_header_bytes={limit}"
        return exc.error_status_hint, f"malformed request: {exc}"

    async def _respond(self, event: h11.Request) -> bool:
        """Answers one request. Returns whether the connection may carry another."""
        self._body_received = 0
        self._body_waited = 0.0
        self._close_after_response = self._requests >= self._limits.max_requests_per_connection
        try:
            request = self._build_request(event)
        except HTTPError as exc:
            await self._send_error(exc.status, exc.message)
            return False

        with trio.CancelScope() as scope:
            self._handler_scope = scope
            if self._eof:
                scope.cancel()  # the client left before we got here: the pump cancelled nothing
            try:
                response = await self._call_handler(request)
                await self._send_response(request, response)
            finally:
                self._handler_scope = None
        if scope.cancelled_caught:
            raise _ConnectionLost  # the pump saw the client leave

        if self._h11.their_state is h11.SEND_BODY and not self._close_after_response:
            return await self._drain()
        return not self._close_after_response

    def _build_request(self, event: h11.Request) -> Request:
        try:
            target = event.target.decode("ascii")
        except UnicodeDecodeError:
            raise HTTPError(400, "request-target is not ASCII") from None
        split = urllib.parse.urlsplit(target)
        try:
            path = urllib.parse.unquote(split.path, errors="strict")
            query = urllib.parse.parse_qs(split.query, keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise HTTPError(400, "request-target is not valid percent-encoded UTF-8") from None
        headers = Headers(event.headers)
        length = headers.get("content-length")  # h11 validated it: digits, one value
        return Request(
            method=event.method.decode("ascii"),
            target=target,
            path=path,
            query=query,
            headers=headers,
            client=self._client,
            body=RequestBody(self, int(length) if length is not None else None),
            http_version=event.http_version.decode("ascii"),
        )

    async def _call_handler(self, request: Request) -> Response:
        try:
            response = await self._server.handler(request)
        except Exception as raised:
            exc = _sole_exception(raised)
            if isinstance(exc, HTTPError):
                return _error_response(exc.status, exc.message, exc.headers)
            if isinstance(exc, ClientDisconnected):
                raise _ConnectionLost from None
            _log.exception("handler failed on %s %s", request.method, request.target)
            return _error_response(500, "internal server error")
        if not 200 <= response.status <= 999:
            # 1xx (101 included) would put h11 into states we do not serve.
            _log.error("handler answered %s %s with %d", request.method, request.target, response.status)
            await _aclose_body(response.body)
            return _error_response(500, "internal server error")
        return response

    # ---- request bodies ------------------------------------------------------------------------

    async def receive_body_chunk(self) -> bytes | None:
        """BodySource for the current request: each wait bounded by body_chunk_timeout and by
        body_min_rate (the time the bytes received so far buy at that rate)."""
        if self._h11.their_state is not h11.SEND_BODY:
            return None
        if self._h11.they_are_waiting_for_100_continue:
            await self._send(
                self._h11.send(h11.InformationalResponse(status_code=100, headers=[], reason=_reason(100)))
            )
        self._reading_body = True
        try:
            while True:
                event = await self._next_body_event()
                if isinstance(event, h11.Data):
                    if event.data:
                        self._body_received += len(event.data)
                        return bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return None
                else:  # PAUSED/ConnectionClosed cannot come while their_state is SEND_BODY
                    raise _ConnectionLost
        finally:
            self._reading_body = False
            if self._eof and self._handler_scope is not None:
                self._handler_scope.cancel()

    async def _next_body_event(self) -> Any:
        limits = self._limits
        earned = self._body_received / limits.body_min_rate
        rate_budget = max(limits.body_rate_grace, earned) - self._body_waited
        wait = min(limits.body_chunk_timeout, rate_budget)
        started = trio.current_time()
        try:
            if self._unchecked_body and self._chunk_sizes is not None:
                unchecked, self._unchecked_body = self._unchecked_body, b""
                self._chunk_sizes.feed(unchecked)
            return await self._next_event(started + wait)
        except _Timeout:
            self._close_after_response = True
            if wait < limits.body_chunk_timeout:
                raise BodyTimeout(
                    f"request body slower than body_min_rate={limits.body_min_rate:g} B/s"
                ) from None
            raise BodyTimeout(
                f"no request body data within body_chunk_timeout={limits.body_chunk_timeout:g}s"
            ) from None
        except ChunkSizeError as exc:
            self._close_after_response = True
            raise HTTPError(400, f"malformed request body: {exc}") from None
        except h11.RemoteProtocolError as exc:
            self._close_after_response = True
            if self._eof:
                raise ClientDisconnected("client closed the connection mid-body") from None
            raise HTTPError(400, f"malformed request body: {exc}") from None
        finally:
            self._body_waited += trio.current_time() - started

    async def _drain(self) -> bool:
        """Reads and drops an unread body (up to DRAIN_LIMIT) so the connection can be reused."""
        if self._h11.they_are_waiting_for_100_continue:
            return False  # the client may never send it; only a close is unambiguous
        drained = 0
        try:
            while (chunk := await self.receive_body_chunk()) is not None:
                drained += len(chunk)
                if drained > DRAIN_LIMIT:
                    return False
        except (HTTPError, ClientDisconnected):
            return False
        return True

    # ---- responses -----------------------------------------------------------------------------

    async def _send_response(self, request: Request, response: Response) -> None:
        headers = [(k.lower(), v) for k, v in response.headers]
        names = {k for k, _ in headers}
        body = response.body
        bodyless = request.method == "HEAD" or response.status in (204, 304)
        if (
            isinstance(body, bytes | bytearray | memoryview)
            and "content-length" not in names
            and response.status not in (204, 304)  # these must not carry one (RFC 9110 §8.6)
        ):
            headers.append(("content-length", str(len(body))))
        if self._h11.their_state is h11.SEND_BODY:
            # The body is unread. Keep the connection only if draining the rest is cheap.
            length = request.body.content_length
            remaining = None if length is None else length - request.body.bytes_received
            if self._h11.they_are_waiting_for_100_continue or (
                remaining is not None and remaining > DRAIN_LIMIT
            ):
                self._close_after_response = True
        if self._close_after_response:
            headers.append(("connection", "close"))
        headers.append(("server", self._server.server_header))
        headers.append(("date", _http_date()))
        try:
            # Validates names and values before h11's state changes, so a bad header is a 500.
            head = h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status))
        except (h11.LocalProtocolError, ValueError, TypeError):
            _log.exception("invalid response head for %s %s", request.method, request.target)
            await _aclose_body(body)
            await self._send_error(500, "internal server error")
            return
        if isinstance(body, bytes | bytearray | memoryview):
            # Head, body and end in one write: one syscall (and one packet) for most answers.
            data = self._h11.send(head) or b""
            if body and not bodyless:
                data += self._h11.send(h11.Data(data=bytes(body))) or b""
            data += self._h11.send(h11.EndOfMessage()) or b""
            await self._send(data)
            return
        await self._send(self._h11.send(head))
        if bodyless:
            await _aclose_body(body)
        else:
            await self._stream_body(request, body)
        await self._send(self._h11.send(h11.EndOfMessage()))

    async def _stream_body(self, request: Request, body: AsyncIterable[bytes]) -> None:
        iterator = aiter(body)
        try:
            async for chunk in iterator:
                if chunk:
                    await self._send(self._h11.send(h11.Data(data=chunk)))
        except _ConnectionLost:
            raise
        except Exception:
            # Headers are out: all we can do is cut the response short so the client sees it.
            _log.exception("response body of %s %s failed", request.method, request.target)
            raise _ConnectionLost from None
        finally:
            await _aclose_body(iterator)

    async def _send_error(self, status: int, message: str) -> None:
        """Answers an error before or instead of a handler's response, and closes after it."""
        _log.debug("answering %s with %d: %s", self._client, status, message)
        self._close_after_response = True
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response is already under way; closing is all that is left
        body = json.dumps({"error": message}, separators=(",", ":")).encode()
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("connection", "close"),
            ("server", self._server.server_header),
        ]
        data = self._h11.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
        data = (data or b"") + (self._h11.send(h11.Data(data=body)) or b"")
        data += self._h11.send(h11.EndOfMessage()) or b""
        # An error answer is small: a peer that cannot take it within header_timeout (e.g. one
        # stalling its TLS handshake) does not get send_timeout as well.
        await self._send(data, min(self._limits.send_timeout, self._limits.header_timeout))

    async def _send(self, data: bytes | None, within: float | None = None) -> None:
        if not data:
            return
        with trio.move_on_after(within or self._limits.send_timeout) as scope:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _ConnectionLost from None
        if scope.cancelled_caught:
            _log.info("send to %s stalled, closing", self._client)
            raise _ConnectionLost

    async def _linger(self) -> None:
        """Half-closes, then discards input briefly, so our last answer is not lost to a RST."""
        if self._eof or not isinstance(self._stream, trio.abc.HalfCloseableStream):
            return
        self._discard = True
        self._inbox.clear()
        self._space_freed.fire()
        try:
            await self._stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        with trio.move_on_after(LINGER_TIMEOUT):
            while not self._eof:
                await self._data_arrived.wait()


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The Date header's value, formatted once a second (it has a resolution of one)."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


def _sole_exception(exc: Exception) -> Exception:
    """The one exception inside (nested) single-member groups, as trio's nurseries raise them."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _error_response(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response.json({"error": message}, status=status, headers=headers or [])


async def _aclose_body(body: object) -> None:
    """Closes an abandoned async iterator, bounded, even while we are being cancelled."""
    aclose = getattr(body, "aclose", None)
    if aclose is None:
        return
    with trio.CancelScope(shield=True), trio.move_on_after(ACLOSE_TIMEOUT):
        try:
            await aclose()
        except Exception:
            _log.exception("closing a response body failed")
