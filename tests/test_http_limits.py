"""service.http.server limits and misbehaving peers, one at a time (the storm is in test_http_abuse)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import trio
import trio.testing
from test_http_server import TIMEOUT, RawClient, app, get, start_server, wait_until

from service.http import (
    BodyTimeout,
    ClientDisconnected,
    HttpLimits,
    Request,
    Response,
)


async def test_huge_headers_431(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(max_header_bytes=8 * 1024))
    c = await RawClient.connect(port)
    await c.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    r = await c.response()
    assert r.status == 431 and r.headers["connection"] == "close"
    assert json.loads(r.body) == {"error": "request head exceeds max_header_bytes=8 KiB"}
    assert await c.closed()


async def test_endless_head_without_terminator_431(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(max_header_bytes=8 * 1024))
    c = await RawClient.connect(port)
    await c.send(b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 2000)  # never ends the head
    assert (await c.response()).status == 431


async def test_too_many_headers_431(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(max_header_count=20))
    c = await RawClient.connect(port)
    await c.send(get("/", "".join(f"X-{i}: v\r\n" for i in range(30))))
    r = await c.response()
    assert r.status == 431
    assert json.loads(r.body) == {"error": "31 header fields exceed max_header_count=20"}
    assert await c.closed()


async def test_long_request_line_414(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(max_header_bytes=4096))
    c = await RawClient.connect(port)
    await c.send(b"GET /" + b"a" * 10_000)
    r = await c.response()
    assert r.status == 414
    assert json.loads(r.body) == {"error": "request line exceeds max_header_bytes=4 KiB"}


async def test_garbage_400(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    for garbage in (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS ClientHello, say
        b"HELLO\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n",
    ):
        c = await RawClient.connect(port)
        await c.send(garbage)
        r = await c.response()
        assert r.status in (400, 501), garbage
        assert r.headers["connection"] == "close"
        assert await c.closed()


async def test_bad_chunked_body_400(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    await c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    r = await c.response()
    assert r.status == 400 and "malformed request body" in json.loads(r.body)["error"]
    assert await c.closed()


async def test_non_ascii_target_400(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    for target in (b"/caf\xc3\xa9", b"/%ff%fe"):
        c = await RawClient.connect(port)
        await c.send(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await c.response()).status == 400


async def test_http2_version_505(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    await c.send(b"GET / HTTP/2.0\r\nHost: t\r\n\r\n")
    r = await c.response()
    assert r.status == 505 and await c.closed()
    # An h2 prior-knowledge preface is just garbage to an HTTP/1.1 server.
    c = await RawClient.connect(port)
    await c.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert (await c.response()).status in (400, 505)


async def test_slowloris_head_408(nursery: trio.Nursery) -> None:
    server, port = await start_server(nursery, limits=HttpLimits(header_timeout=0.3))
    c = await RawClient.connect(port)
    await c.send(b"GET / HTTP/1.1\r\nHost: t\r\n")
    start = trio.current_time()
    for _ in range(100):  # one header line every 50 ms: each byte resets nothing
        try:
            await c.send(b"X-Slow: 1\r\n")
        except trio.BrokenResourceError:
            break
        with trio.move_on_after(0.05):
            if c.buf or await c._fill():
                break
    r = await c.response()
    assert r.status == 408 and "header_timeout=0.3s" in json.loads(r.body)["error"]
    assert trio.current_time() - start < 2
    await c.aclose()
    await wait_until(lambda: server.open_connections == 0)


async def test_silent_connection_gets_408_after_header_timeout(nursery: trio.Nursery) -> None:
    server, port = await start_server(nursery, limits=HttpLimits(header_timeout=0.2))
    c = await RawClient.connect(port)
    # Nothing sent at all: the connection is dropped without an answer. (Not waiting to see it counted
    # open first: a pause longer than the timeout would miss that moment.)
    assert await c.closed()
    await wait_until(lambda: server.open_connections == 0)


async def test_keepalive_timeout_closes_quietly(nursery: trio.Nursery) -> None:
    server, port = await start_server(nursery, limits=HttpLimits(keepalive_timeout=0.2))
    c = await RawClient.connect(port)
    await c.send(get("/hello"))
    assert (await c.response()).status == 200
    assert await c.closed()  # EOF, no 408
    await wait_until(lambda: server.open_connections == 0)


async def test_keepalive_timer_rearmed_after_streamed_response(nursery: trio.Nursery) -> None:
    server, port = await start_server(nursery, limits=HttpLimits(keepalive_timeout=0.2))
    c = await RawClient.connect(port)
    await c.send(get("/stream"))
    assert len((await c.response()).chunks) == 3
    assert await c.closed()
    await wait_until(lambda: server.open_connections == 0)


async def trickle(c: RawClient, data: bytes, every: float) -> None:
    """Sends one byte per `every` seconds, as a trickling client does (pacing, not synchronisation)."""
    for i in range(len(data)):
        try:
            await c.send(data[i : i + 1])
        except trio.BrokenResourceError:
            return
        await trio.sleep(every)


async def test_trickled_body_408_by_min_rate(nursery: trio.Nursery) -> None:
    seen: list[BaseException] = []

    async def handler(request: Request) -> Response:
        try:
            await request.body.read(1 << 20)
        except BodyTimeout as exc:
            seen.append(exc)
            raise
        return Response(200)

    limits = HttpLimits(body_min_rate=1000, body_rate_grace=0.3, body_chunk_timeout=5)
    server, port = await start_server(nursery, handler, limits)
    c = await RawClient.connect(port)
    await c.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
    async with trio.open_nursery() as n:
        n.start_soon(trickle, c, b"x" * 1000, 0.02)
        r = await c.response()
        n.cancel_scope.cancel()
    assert r.status == 408 and r.headers["connection"] == "close"
    assert "body_min_rate=1000 B/s" in json.loads(r.body)["error"]
    assert len(seen) == 1
    await c.aclose()
    await wait_until(lambda: server.open_connections == 0)


async def test_stalled_body_408_by_chunk_timeout(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, app, HttpLimits(body_chunk_timeout=0.2))
    c = await RawClient.connect(port)
    await c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
    r = await c.response()
    assert r.status == 408
    assert "body_chunk_timeout=0.2s" in json.loads(r.body)["error"]


async def test_client_vanishes_mid_upload(nursery: trio.Nursery) -> None:
    outcome: list[BaseException] = []
    done = trio.Event()

    async def handler(request: Request) -> Response:
        try:
            async for _ in request.body:
                pass
        except ClientDisconnected as exc:
            outcome.append(exc)
        finally:
            done.set()
        return Response(200)

    server, port = await start_server(nursery, handler)
    for vanish in ("close", "reset"):
        done = trio.Event()
        c = await RawClient.connect(port)
        await c.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 5000)
        await wait_until(lambda: server.open_connections == 1)
        await (c.aclose() if vanish == "close" else c.reset())
        with trio.fail_after(TIMEOUT):
            await done.wait()
        await wait_until(lambda: server.open_connections == 0)
    assert len(outcome) == 2 and all(isinstance(e, ClientDisconnected) for e in outcome)


async def test_client_vanishes_while_handler_waits(nursery: trio.Nursery) -> None:
    cancelled = trio.Event()
    entered = trio.Event()

    async def handler(request: Request) -> Response:
        entered.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    server, port = await start_server(nursery, handler)
    c = await RawClient.connect(port)
    await c.send(get("/"))
    with trio.fail_after(TIMEOUT):
        await entered.wait()
    await c.aclose()
    with trio.fail_after(TIMEOUT):
        await cancelled.wait()
    await wait_until(lambda: server.open_connections == 0)


async def test_client_vanishes_mid_streamed_response(nursery: trio.Nursery) -> None:
    closed = trio.Event()
    first_sent = trio.Event()

    async def events() -> AsyncIterator[bytes]:
        try:
            yield b"event 1\n"
            first_sent.set()
            await trio.sleep_forever()  # an SSE stream waiting for the next event
            yield b"never"
        finally:
            closed.set()

    async def handler(request: Request) -> Response:
        return Response(200, [("content-type", "text/event-stream")], events())

    server, port = await start_server(nursery, handler)
    c = await RawClient.connect(port)
    await c.send(get("/sse"))
    await c.response(head=True)
    assert await c.chunk() == b"event 1\n"
    await c.reset()
    with trio.fail_after(TIMEOUT):
        await closed.wait()
    await wait_until(lambda: server.open_connections == 0)
    c = await RawClient.connect(port)  # the server lives on
    await c.send(get("/"))
    assert (await c.response(head=True)).status == 200


async def test_reader_that_never_reads_hits_send_timeout(nursery: trio.Nursery) -> None:
    closed = trio.Event()

    async def firehose() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x" * 65536
        finally:
            closed.set()

    async def handler(request: Request) -> Response:
        return Response(200, body=firehose())

    server, port = await start_server(nursery, handler, HttpLimits(send_timeout=0.3))
    c = await RawClient.connect(port)
    await c.send(get("/"))  # and then never read
    with trio.fail_after(TIMEOUT):
        await closed.wait()
    await wait_until(lambda: server.open_connections == 0)


async def test_connection_close_then_second_request_in_same_packet(nursery: trio.Nursery) -> None:
    """This crashed hypercorn's trio worker (BusyResourceError)."""
    server, port = await start_server(nursery)
    c = await RawClient.connect(port)
    await c.send(get("/hello?n=1", "Connection: close\r\n") + get("/hello?n=2"))
    r = await c.response()
    assert json.loads(r.body)["query"] == {"n": ["1"]}
    assert await c.closed()  # the second request is never answered
    await c.aclose()
    await wait_until(lambda: server.open_connections == 0)
    c = await RawClient.connect(port)
    await c.send(get("/hello"))
    assert (await c.response()).status == 200


async def test_websocket_upgrade_with_extra_bytes(nursery: trio.Nursery) -> None:
    """This crashed hypercorn too (h11 LocalProtocolError)."""
    server, port = await start_server(nursery, limits=HttpLimits(header_timeout=0.3))
    upgrade = get(
        "/v1/tunnel",
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    )
    c = await RawClient.connect(port)
    await c.send(upgrade + b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58")  # a masked WS frame
    r = await c.response()
    assert r.status == 404
    # The frame bytes are then read as the next request head, which never completes.
    assert (await c.response()).status == 408
    assert await c.closed()
    # Upgrade without extra bytes: a normal answer and the connection stays usable.
    c = await RawClient.connect(port)
    await c.send(upgrade + get("/hello"))
    assert (await c.response()).status == 404
    assert (await c.response()).status == 200
    await wait_until(lambda: server.open_connections == 1)


async def test_h2c_upgrade_is_ignored(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    await c.send(get("/hello", "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: \r\n"))
    assert (await c.response()).status == 200


async def test_connect_method_does_not_switch_protocols(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    await c.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n" + get("/"))
    assert (await c.response()).status == 404
    assert (await c.response()).status == 404


async def test_oversized_head_pipelined_behind_small_requests_431(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(max_header_bytes=8 * 1024))
    big = get("/hello", "X-Big: " + "a" * 20_000 + "\r\n")
    c = await RawClient.connect(port)
    await c.send(get("/hello") + b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc" + big)
    assert (await c.response()).status == 200
    assert (await c.response()).body == b"abc"
    assert (await c.response()).status == 431


async def test_request_then_immediate_close_cancels_handler(nursery: trio.Nursery) -> None:
    """The client is gone before the handler starts: the handler must not wait forever."""
    cancelled = trio.Event()

    async def handler(request: Request) -> Response:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    server, port = await start_server(nursery, handler)
    for _ in range(3):
        cancelled = trio.Event()
        c = await RawClient.connect(port)
        await c.send(get("/"))
        await c.aclose()
        with trio.fail_after(TIMEOUT):
            await cancelled.wait()
    await wait_until(lambda: server.open_connections == 0)


async def test_content_length_with_transfer_encoding_400(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    c = await RawClient.connect(port)
    await c.send(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n" + get("/smuggled")
    )
    r = await c.response()
    assert r.status == 400 and "both Content-Length and Transfer-Encoding" in r.body.decode()
    assert await c.closed()


# ---- heads that arrive in pieces: real networks split them anywhere --------------------------------


async def _send_in_pieces(c: RawClient, pieces: list[bytes]) -> None:
    """Each piece in its own write, the server reading it before the next (one read per piece)."""
    for piece in pieces:
        await c.send(piece)
        await trio.testing.wait_all_tasks_blocked(cushion=0.001)


async def test_head_split_at_every_byte(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    request = get("/hello?x=1", "Accept: */*\r\n")
    for at in range(1, len(request)):
        c = await RawClient.connect(port)
        await _send_in_pieces(c, [request[:at], request[at:]])
        r = await c.response()
        assert r.status == 200, (at, r.status, r.body)
        assert json.loads(r.body)["query"] == {"x": ["1"]}
        await c.aclose()


async def test_head_trickled_a_byte_at_a_time(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(header_timeout=5.0))
    request = get("/hello", "X-Trickle: " + "t" * 200 + "\r\n")
    c = await RawClient.connect(port)
    await _send_in_pieces(c, [request[i : i + 1] for i in range(len(request))])
    assert (await c.response()).status == 200
    # The connection stays usable: a second request in one piece.
    await c.send(get("/hello"))
    assert (await c.response()).status == 200


async def test_split_body_after_split_head(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    request = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world"
    c = await RawClient.connect(port)
    await _send_in_pieces(c, [request[:7], request[7:40], request[40:]])
    r = await c.response()
    assert r.status == 200 and r.body == b"hello world"


async def test_oversized_header_in_pieces_431(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(max_header_bytes=4096))
    c = await RawClient.connect(port)
    await _send_in_pieces(c, [b"GET / HTTP/1.1\r\nHost: t\r\n", b"X-Big: " + b"a" * 1000] + [b"a" * 1000] * 5)
    r = await c.response()
    assert r.status == 431
    assert json.loads(r.body) == {"error": "request head exceeds max_header_bytes=4 KiB"}


async def test_oversized_request_line_in_pieces_414(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(max_header_bytes=4096))
    c = await RawClient.connect(port)
    await _send_in_pieces(c, [b"GET /"] + [b"a" * 1000] * 6)
    r = await c.response()
    assert r.status == 414
    assert json.loads(r.body) == {"error": "request line exceeds max_header_bytes=4 KiB"}


async def test_impossible_chunk_size_400(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    head = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    for pieces in (
        [head + b"ffffffffffffffffff\r\nabc\r\n0\r\n\r\n"],  # with the head, in one write
        [head, b"ffffffffffffffffff\r\n", b"abc\r\n0\r\n\r\n"],  # after it
        [head + b"3\r\nabc\r\nfffff", b"fffffffffffff;ext=1\r\n"],  # a second chunk, its size split
    ):
        c = await RawClient.connect(port)
        await _send_in_pieces(c, pieces)
        r = await c.response()
        assert r.status == 400, (pieces, r.status)
        assert "chunk size ffffffffffffffffff exceeds" in json.loads(r.body)["error"]
        assert await c.closed()


async def test_chunked_body_in_pieces(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    body = b"5;name=v\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\n"
    request = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + body + get("/hello")
    for at in range(40, len(request) - 20, 3):
        c = await RawClient.connect(port)
        await _send_in_pieces(c, [request[:at], request[at:]])
        r = await c.response()
        assert (r.status, r.body) == (200, b"hello world"), at
        assert (await c.response()).status == 200  # the pipelined request behind it
        await c.aclose()
