"""service.http.server over real sockets: a raw-bytes client for exact wire behaviour, httpx for the rest.

The helpers at the top (RawClient, start_server, app) are shared with the other test_http_* files.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest
import trio
import trustme

from service.http import (
    Headers,
    HTTPError,
    HttpLimits,
    HttpServer,
    Request,
    RequestBody,
    Response,
)

TIMEOUT = 5.0

# ---- shared helpers ------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)


class RawClient:
    """Speaks HTTP/1.1 as bytes, so tests control exactly what goes on the wire."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        with trio.fail_after(TIMEOUT):
            await self.stream.send_all(data)

    async def _fill(self) -> bool:
        with trio.fail_after(TIMEOUT):
            data = await self.stream.receive_some(65536)
        self.buf += data
        return bool(data)

    async def _read_until(self, sep: bytes) -> bytes:
        while (i := self.buf.find(sep)) < 0:
            if not await self._fill():
                raise EOFError(f"connection closed before {sep!r}; got {bytes(self.buf)!r}")
        out = bytes(self.buf[: i + len(sep)])
        del self.buf[: i + len(sep)]
        return out

    async def _read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self._fill():
                raise EOFError("connection closed mid-body")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def response(self, *, head: bool = False) -> RawResponse:
        lines = (await self._read_until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        resp = RawResponse(status, headers)
        if head or status < 200 or status in (204, 304):
            return resp
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await self._read_until(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self._read_until(b"\r\n")
                    break
                resp.chunks.append(await self._read_exactly(size))
                await self._read_exactly(2)
            resp.body = b"".join(resp.chunks)
        elif "content-length" in headers:
            resp.body = await self._read_exactly(int(headers["content-length"]))
        else:
            while await self._fill():
                pass
            resp.body, self.buf = bytes(self.buf), bytearray()
        return resp

    async def chunk(self) -> bytes:
        """One chunk of a chunked body (after `response(head=True)`)."""
        size = int((await self._read_until(b"\r\n")).split(b";")[0], 16)
        data = await self._read_exactly(size)
        await self._read_exactly(2)
        return data

    async def closed(self) -> bool:
        """True if the server closes the connection (EOF or reset) with nothing more to say."""
        try:
            while await self._fill():
                pass
        except trio.BrokenResourceError:
            pass
        return not self.buf

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def reset(self) -> None:
        """Abort the connection with a TCP RST, as a crashed client or a middlebox would."""
        self.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.stream.aclose()


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


async def stream_numbers(n: int) -> AsyncIterator[bytes]:
    for i in range(n):
        yield f"data: {i}\n\n".encode()


async def app(request: Request) -> Response:
    """A handler with one route per behaviour under test."""
    if request.path == "/hello":
        return Response.json({"path": request.path, "query": request.query, "method": request.method})
    if request.path == "/echo":
        body = await request.body.read(8 * 1024 * 1024)
        return Response(200, [("content-type", "application/octet-stream")], body)
    if request.path == "/ignore":
        return Response(200, body=b"ignored")
    if request.path == "/stream":
        return Response(200, [("content-type", "text/event-stream")], stream_numbers(3))
    if request.path == "/conflict":
        raise HTTPError(409, "job 7 is already completed", [("x-job", "7")])
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    if request.path == "/empty":
        return Response(204)
    return Response.json({"error": "not found"}, status=404)


async def start_server(
    nursery: trio.Nursery,
    handler: Callable[[Request], Awaitable[Response]] = app,
    limits: HttpLimits | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[HttpServer, int]:
    server = HttpServer(handler, limits or HttpLimits(), ssl_context=ssl_context)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    return server, port


async def wait_until(predicate: Callable[[], bool], within: float = TIMEOUT) -> None:
    """Polls a counter with a deadline (counters have no event to wait on)."""
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - fds and task counts have no event to wait on
            await trio.sleep(0.01)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def task_count() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


# ---- tests ---------------------------------------------------------------------------------------


async def test_get_with_httpx(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{port}/hello?state=queued&state=held&x=%20y")
        assert r.status_code == 200
        assert r.json() == {
            "path": "/hello",
            "query": {"state": ["queued", "held"], "x": [" y"]},
            "method": "GET",
        }
        assert r.headers["server"] == "printrelay"
        assert "date" in r.headers
        r = await client.post(f"http://127.0.0.1:{port}/echo", content=b"x" * 300_000)
        assert r.status_code == 200 and r.content == b"x" * 300_000


async def test_percent_decoded_path_and_raw_target(nursery: trio.Nursery) -> None:
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        return Response(200)

    _, port = await start_server(nursery, handler)
    c = await RawClient.connect(port)
    await c.send(get("/v1/printers/a%2Fb%20c?q=1"))
    assert (await c.response()).status == 200
    assert seen[0].path == "/v1/printers/a/b c"
    assert seen[0].target == "/v1/printers/a%2Fb%20c?q=1"
    assert seen[0].client is not None and seen[0].client[0] == "127.0.0.1"
    assert seen[0].headers.get("HOST") == "t"


async def test_keepalive_reuses_connection(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    for i in range(5):
        await c.send(get(f"/hello?i={i}"))
        r = await c.response()
        assert r.status == 200 and json.loads(r.body)["query"] == {"i": [str(i)]}


async def test_pipelined_requests_answered_in_order(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    body = b"pipelined body"
    await c.send(
        get("/hello?n=1")
        + b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
        + get("/stream")
        + get("/hello?n=2")
    )
    assert json.loads((await c.response()).body)["query"] == {"n": ["1"]}
    assert (await c.response()).body == body
    assert (await c.response()).chunks == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    assert json.loads((await c.response()).body)["query"] == {"n": ["2"]}


async def test_chunked_request_body(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    await c.send(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
    )
    r = await c.response()
    assert r.status == 200 and r.body == b"hello world"
    await c.send(get("/hello"))
    assert (await c.response()).status == 200


async def test_expect_100_continue_sent_when_handler_reads(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    await c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert (await c.response()).status == 100
    await c.send(b"data")
    r = await c.response()
    assert r.status == 200 and r.body == b"data"


async def test_expect_100_continue_refused_without_reading(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    await c.send(b"POST /ignore HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    r = await c.response()
    # No 100 went out, so whether the body follows is unknowable: answer and close.
    assert r.status == 200 and r.headers["connection"] == "close"
    assert await c.closed()


async def test_head_has_length_and_no_body(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    await c.send(b"HEAD /ignore HTTP/1.1\r\nHost: t\r\n\r\n" + get("/ignore"))
    r = await c.response(head=True)
    assert r.status == 200 and r.headers["content-length"] == "7"
    r = await c.response()  # framing intact: the next response starts right after the head
    assert r.body == b"ignored"


async def test_head_on_streamed_response_closes_the_iterator(nursery: trio.Nursery) -> None:
    closed = trio.Event()

    async def events() -> AsyncIterator[bytes]:
        try:
            yield b"never"
        finally:
            closed.set()

    async def handler(request: Request) -> Response:
        it = events()
        await it.__anext__()  # started, so it has a finally to run
        return Response(200, body=it)

    _, port = await start_server(nursery, handler)
    c = await RawClient.connect(port)
    await c.send(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await c.response(head=True)).status == 200
    with trio.fail_after(TIMEOUT):
        await closed.wait()


async def test_204_sends_no_body(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    await c.send(get("/empty") + get("/hello"))
    r = await c.response()
    assert r.status == 204 and "content-length" not in r.headers
    assert (await c.response()).status == 200


async def test_streamed_response_then_pipelined_request(nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def slow_events() -> AsyncIterator[bytes]:
        yield b"first"
        await release.wait()
        yield b"second"

    async def handler(request: Request) -> Response:
        if request.path == "/sse":
            return Response(200, [("content-type", "text/event-stream")], slow_events())
        return await app(request)

    _, port = await start_server(nursery, handler)
    c = await RawClient.connect(port)
    await c.send(get("/sse"))
    r = await c.response(head=True)
    assert r.headers["transfer-encoding"] == "chunked"
    assert await c.chunk() == b"first"
    # The next request arrives while the stream is still open: it must wait, then be answered.
    await c.send(get("/hello?after=sse"))
    release.set()
    assert await c.chunk() == b"second"
    assert await c.chunk() == b""  # last-chunk
    r = await c.response()
    assert json.loads(r.body)["query"] == {"after": ["sse"]}


async def test_http_error_and_handler_crash(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    await c.send(get("/conflict"))
    r = await c.response()
    assert r.status == 409 and json.loads(r.body) == {"error": "job 7 is already completed"}
    assert r.headers["x-job"] == "7"
    with caplog.at_level(logging.ERROR, logger="printrelay.http"):
        await c.send(get("/boom"))
        r = await c.response()
    assert r.status == 500 and json.loads(r.body) == {"error": "internal server error"}
    assert "handler bug" not in r.body.decode()
    assert any(rec.exc_info and "handler bug" in str(rec.exc_info[1]) for rec in caplog.records)
    await c.send(get("/hello"))  # same connection lives on
    assert (await c.response()).status == 200


async def test_invalid_response_from_handler_is_500(nursery: trio.Nursery) -> None:
    async def handler(request: Request) -> Response:
        if request.path == "/101":
            return Response(101, [("upgrade", "websocket")])
        return Response(200, [("bad header", "x")])

    _, port = await start_server(nursery, handler)
    c = await RawClient.connect(port)
    await c.send(get("/101"))
    assert (await c.response()).status == 500
    c = await RawClient.connect(port)
    await c.send(get("/bad"))
    assert (await c.response()).status == 500


async def test_connection_close_requested_by_client(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    await c.send(get("/hello", "Connection: close\r\n"))
    r = await c.response()
    assert r.status == 200 and r.headers["connection"] == "close"
    assert await c.closed()


async def test_http10_client(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    await c.send(b"GET /stream HTTP/1.0\r\n\r\n")
    r = await c.response()  # no chunked for 1.0: the body ends with the connection
    assert r.status == 200 and r.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_unread_small_body_is_drained_and_connection_kept(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    body = b"z" * 200_000
    await c.send(b"POST /ignore HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body))
    await c.send(body + get("/hello"))
    r = await c.response()
    assert r.status == 200 and "connection" not in r.headers
    assert (await c.response()).status == 200


async def test_unread_large_body_closes_connection(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    await c.send(b"POST /ignore HTTP/1.1\r\nHost: t\r\nContent-Length: 50000000\r\n\r\nabc")
    r = await c.response()
    assert r.status == 200 and r.headers["connection"] == "close"
    assert await c.closed()


async def test_body_too_large_names_the_limit(nursery: trio.Nursery) -> None:
    async def handler(request: Request) -> Response:
        await request.body.read(1024, limit_name="max_job_bytes")
        return Response(200)

    _, port = await start_server(nursery, handler)
    c = await RawClient.connect(port)
    await c.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4096\r\n\r\n" + b"x" * 4096)
    r = await c.response()
    assert r.status == 413
    assert json.loads(r.body) == {"error": "request body 4 KiB exceeds max_job_bytes=1 KiB"}
    await c.send(get("/"))  # body was drained: the connection is still usable
    assert (await c.response()).status == 200


async def test_max_requests_per_connection(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(max_requests_per_connection=2))
    c = await RawClient.connect(port)
    await c.send(get("/hello") + get("/hello") + get("/hello"))
    assert "connection" not in (await c.response()).headers
    assert (await c.response()).headers["connection"] == "close"
    assert await c.closed()


async def test_max_connections_answers_503(nursery: trio.Nursery) -> None:
    server, port = await start_server(nursery, limits=HttpLimits(max_connections=2))
    held = [await RawClient.connect(port) for _ in range(2)]
    await wait_until(lambda: server.open_connections == 2)
    extra = await RawClient.connect(port)
    r = await extra.response()
    assert r.status == 503 and r.headers["retry-after"] == "1"
    assert "too many connections" in json.loads(r.body)["error"]
    await held[0].aclose()
    await wait_until(lambda: server.open_connections == 1)
    c = await RawClient.connect(port)
    await c.send(get("/hello"))
    assert (await c.response()).status == 200


async def test_tls(nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    _, port = await start_server(nursery, ssl_context=server_ctx)
    async with httpx.AsyncClient(verify=client_ctx) as client:
        for _ in range(2):
            r = await client.post(f"https://127.0.0.1:{port}/echo", content=b"sealed" * 1000)
            assert r.status_code == 200 and r.content == b"sealed" * 1000


async def test_tls_stalled_handshake_is_dropped(nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    server, port = await start_server(nursery, limits=HttpLimits(header_timeout=0.3), ssl_context=server_ctx)
    silent = await RawClient.connect(port)
    partial = await RawClient.connect(port)
    await partial.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # half a ClientHello
    start = trio.current_time()
    assert await silent.closed() and await partial.closed()
    assert trio.current_time() - start < 5  # header_timeout, not a hang; roomy for a loaded host
    await wait_until(lambda: server.open_connections == 0)


async def test_serve_listeners(nursery: trio.Nursery) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    server = HttpServer(app)
    await nursery.start(server.serve_listeners, listeners)
    c = await RawClient.connect(port)
    await c.send(get("/hello"))
    assert (await c.response()).status == 200


def test_headers_multimap() -> None:
    h = Headers([(b"accept", b"a"), ("Accept", "b"), (b"x-\xe9", b"\xff")])
    assert h.get("ACCEPT") == "a" and h.get_all("accept") == ["a", "b"]
    assert h.get("missing") is None and h.get("missing", "d") == "d"
    assert "Accept" in h and b"accept" in h and 3 not in h
    assert list(h)[2] == ("x-\xe9", "\xff") and len(h) == 3
    assert h.raw()[1] == (b"accept", b"b")


async def test_request_body_from_bytes() -> None:
    body = RequestBody.from_bytes(b"abc")
    assert [c async for c in body] == [b"abc"] and body.bytes_received == 3 and body.complete
    assert await RequestBody.from_bytes(b"").read(0) == b""


async def test_http_error_raised_inside_handler_nursery(nursery: trio.Nursery) -> None:
    async def handler(request: Request) -> Response:
        async def lookup() -> None:
            raise HTTPError(404, "printer p1 not found")

        async with trio.open_nursery() as n:
            n.start_soon(lookup)
        return Response(200)

    _, port = await start_server(nursery, handler)
    c = await RawClient.connect(port)
    await c.send(get("/"))
    r = await c.response()
    assert r.status == 404 and json.loads(r.body) == {"error": "printer p1 not found"}


async def test_a_complete_answer_leaves_in_one_write(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Head, body and end of a bytes response go out in one send (one syscall per answer)."""
    from service.http import server as server_module

    writes: list[bytes] = []
    original = server_module._Connection._send

    async def counting_send(
        self: server_module._Connection, data: bytes | None, within: float | None = None
    ) -> None:
        if data:
            writes.append(data)
        await original(self, data, within)

    monkeypatch.setattr(server_module._Connection, "_send", counting_send)
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    await c.send(get("/hello"))
    r = await c.response()
    assert r.status == 200 and json.loads(r.body)["path"] == "/hello"
    assert len(writes) == 1 and writes[0].endswith(r.body)
