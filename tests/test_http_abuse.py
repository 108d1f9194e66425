"""Abuse storms: many misbehaving clients at once, then the server must answer and hold no residue.

The measure is what leaked for anycorn: open connections, the process's fds and trio's task count
must return to their baseline, and nothing may have been logged as a server failure.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
from test_http_server import (
    RawClient,
    get,
    open_fds,
    start_server,
    task_count,
    wait_until,
)

from service.http import HttpLimits, HttpServer, Request, Response

STORM_SECONDS = 3.0
STORM_CLIENTS = 40

LIMITS = HttpLimits(
    max_header_bytes=16 * 1024,
    header_timeout=0.5,
    keepalive_timeout=0.5,
    body_chunk_timeout=0.5,
    body_min_rate=2000,
    body_rate_grace=0.3,
    send_timeout=0.5,
)


async def ticks() -> AsyncIterator[bytes]:
    """An SSE stream that never ends on its own."""
    i = 0
    while True:
        yield b"data: %d\n\n" % i
        i += 1
        await trio.sleep(0.01)


async def firehose() -> AsyncIterator[bytes]:
    while True:
        yield b"x" * 65536


async def storm_app(request: Request) -> Response:
    if request.path == "/upload":
        n = 0
        async for chunk in request.body:
            n += len(chunk)
        return Response.json({"received": n})
    if request.path == "/sse":
        return Response(200, [("content-type", "text/event-stream")], ticks())
    if request.path == "/firehose":
        return Response(200, body=firehose())
    if request.path == "/slow":
        await trio.sleep(0.05)
    if request.path == "/forever":
        await trio.sleep_forever()
    return Response.json({"ok": True})


# ---- the misbehaviours ---------------------------------------------------------------------------
# Each gets a fresh connection and may fail in any way a misbehaving client fails.


async def partial_body_then_rst(c: RawClient) -> None:
    await c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 30000)
    await c.reset()


async def close_mid_sse(c: RawClient) -> None:
    await c.send(get("/sse"))
    await c.response(head=True)
    await c.chunk()
    await c.chunk()
    await c.aclose()


async def rst_mid_sse(c: RawClient) -> None:
    await c.send(get("/sse"))
    await c.response(head=True)
    await c.chunk()
    await c.reset()


async def pipeline_behind_stream(c: RawClient) -> None:
    await c.send(get("/sse") + get("/hello") * 20)
    await c.response(head=True)
    await c.chunk()
    await c.aclose()


async def slowloris(c: RawClient) -> None:
    await c.send(b"GET / HTTP/1.1\r\nHost: t\r\n")
    for _ in range(40):
        await c.send(b"X-Slow: 1\r\n")
        await trio.sleep(0.05)


async def trickle_body(c: RawClient) -> None:
    await c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(60):
        await c.send(b"x")
        await trio.sleep(0.02)


async def garbage(c: RawClient) -> None:
    await c.send(random.randbytes(random.randrange(1, 3000)) + b"\r\n\r\n")
    await c.response()


async def huge_headers(c: RawClient) -> None:
    await c.send(get("/", "X-Big: " + "a" * 40_000 + "\r\n"))
    # 408 when the storm stalls the head past header_timeout; exact 431 is in test_http_limits.
    assert (await c.response()).status in (431, 408)


async def close_plus_second_request(c: RawClient) -> None:
    await c.send(get("/hello", "Connection: close\r\n") + get("/hello"))
    await c.response()
    await c.closed()


async def upgrade_plus_extra(c: RawClient) -> None:
    await c.send(get("/tunnel", "Connection: Upgrade\r\nUpgrade: websocket\r\n") + b"\x81\x85\x37\xfa" * 8)
    await c.response()
    await c.aclose()


async def never_read(c: RawClient) -> None:
    await c.send(get("/firehose"))
    await trio.sleep(0.8)  # past send_timeout, holding a full receive window


async def expect_continue_then_vanish(c: RawClient) -> None:
    await c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n")
    await c.response()
    await c.reset()


async def pipelined_flood(c: RawClient) -> None:
    await c.send(get("/slow") * 500)  # 20 KiB of requests; stops reading after one answer
    await c.response()
    await c.reset()


async def connect_and_vanish(c: RawClient) -> None:
    await c.reset()


async def request_then_vanish(c: RawClient) -> None:
    await c.send(get("/forever"))  # a handler that would wait forever for its client
    await c.reset()


async def well_behaved(c: RawClient) -> None:
    for _ in range(3):
        await c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 4096\r\n\r\n" + b"y" * 4096)
        assert (await c.response()).status == 200


KINDS: list[Callable[[RawClient], Awaitable[None]]] = [
    partial_body_then_rst,
    close_mid_sse,
    rst_mid_sse,
    pipeline_behind_stream,
    slowloris,
    trickle_body,
    garbage,
    huge_headers,
    close_plus_second_request,
    upgrade_plus_extra,
    never_read,
    expect_continue_then_vanish,
    pipelined_flood,
    connect_and_vanish,
    request_then_vanish,
    well_behaved,
]


async def misbehave(port: int, kind: Callable[[RawClient], Awaitable[None]]) -> None:
    c = await RawClient.connect(port)
    try:
        with trio.move_on_after(2):
            await kind(c)
    except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError, trio.TooSlowError):
        pass  # what misbehaving clients get
    finally:
        await trio.aclose_forcefully(c.stream)


async def storm_worker(port: int, worker: int, deadline: float) -> None:
    i = worker
    while trio.current_time() < deadline:
        await misbehave(port, KINDS[i % len(KINDS)])
        i += 1


async def assert_no_residue(
    server: HttpServer, port: int, fds: int, tasks: int, caplog: pytest.LogCaptureFixture
) -> None:
    c = await RawClient.connect(port)
    await c.send(get("/hello", "Connection: close\r\n"))
    assert (await c.response()).status == 200
    await c.closed()
    await c.aclose()
    await wait_until(lambda: server.open_connections == 0, within=10)
    await wait_until(lambda: open_fds() <= fds, within=10)
    await wait_until(lambda: task_count() <= tasks, within=10)
    failures = [r for r in caplog.records if r.name == "printrelay.http" and r.exc_info]
    assert not failures, failures[0].getMessage()


async def baseline(server: HttpServer, port: int) -> tuple[int, int]:
    """fds and tasks once the server has served (lazy imports, first-use allocations) and gone idle."""
    c = await RawClient.connect(port)
    await c.send(get("/hello", "Connection: close\r\n"))
    await c.response()
    await c.aclose()
    await wait_until(lambda: server.open_connections == 0)
    return open_fds(), task_count()


async def test_abuse_storm(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="printrelay.http")
    server, port = await start_server(nursery, storm_app, LIMITS)
    fds, tasks = await baseline(server, port)
    deadline = trio.current_time() + STORM_SECONDS
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, server.open_connections)
            await trio.sleep(0.05)

    async with trio.open_nursery() as storm:
        storm.start_soon(watch)
        async with trio.open_nursery() as workers:
            for w in range(STORM_CLIENTS):
                workers.start_soon(storm_worker, port, w, deadline)
        storm.cancel_scope.cancel()

    assert peak > STORM_CLIENTS // 2  # the storm really was concurrent
    await assert_no_residue(server, port, fds, tasks, caplog)


async def test_thousand_abrupt_disconnects(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    server, port = await start_server(nursery, storm_app, LIMITS)
    fds, tasks = await baseline(server, port)
    openings = [
        b"",
        b"GET / HT",
        get("/hello"),
        get("/sse"),
        b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 999\r\n\r\nabc",
    ]

    async def abrupt(i: int) -> None:
        c = await RawClient.connect(port)
        try:
            if openings[i % len(openings)]:
                await c.send(openings[i % len(openings)])
        finally:
            await (c.reset() if i % 2 else c.aclose())

    for batch in range(20):
        async with trio.open_nursery() as n:
            for i in range(50):
                n.start_soon(abrupt, batch * 50 + i)
    await assert_no_residue(server, port, fds, tasks, caplog)
