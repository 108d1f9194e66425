"""The tunnel's HTTP/2 session over in-memory byte streams."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tunnel.protocol import TunnelSettings
from tunnel.session import ErrorCodes, H2Session, H2Stream, SessionClosed, StreamClosed

Handler = Callable[[H2Stream], Awaitable[None]]


class BlackHole(trio.abc.Stream):
    """A transport whose owner vanishes without closing it: a black-holed network path."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        pass  # the path stays open, silently


@asynccontextmanager
async def session_pair(
    handler: Handler, settings: TunnelSettings | None = None
) -> AsyncIterator[tuple[H2Session, H2Session]]:
    left, right = trio.testing.memory_stream_pair()
    client = H2Session(left, client_side=True, settings=settings, name="relay")
    server = H2Session(right, client_side=False, settings=settings, handler=handler, name="connector")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await nursery.start(client.run)
        yield client, server
        nursery.cancel_scope.cancel()


async def echo_digest(stream: H2Stream) -> None:
    """Server handler: hash the request body and answer with the digest and size."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in stream.iter_data():
        digest.update(chunk)
        size += len(chunk)
    await stream.send_response(200, [("content-type", "text/plain")])
    await stream.send_data(f"{digest.hexdigest()} {size}".encode(), end_stream=True)


async def post(client: H2Session, body: bytes, path: str = "/v1/jobs/x") -> bytes:
    stream = await client.open_stream("POST", path)
    for start in range(0, len(body), 300_000):
        await stream.send_data(body[start : start + 300_000])
    await stream.end()
    await stream.receive_response()
    assert stream.status == 200
    return b"".join([chunk async for chunk in stream.iter_data()])


async def test_many_concurrent_streams_arrive_intact() -> None:
    bodies = [os.urandom(size) for size in (0, 1, 1000, 70_000, 1_100_000, 3_000_000) * 5]
    results: dict[int, bytes] = {}
    async with session_pair(echo_digest) as (client, _), trio.open_nursery() as nursery:
        for index, body in enumerate(bodies):

            async def one(index: int = index, body: bytes = body) -> None:
                results[index] = await post(client, body)

            nursery.start_soon(one)
    for index, body in enumerate(bodies):
        assert results[index] == f"{hashlib.sha256(body).hexdigest()} {len(body)}".encode()


async def test_a_body_read_without_opening_its_window_still_flows_past_it() -> None:
    """The relay reads a job's status lines in the stream's first window: acknowledging what it read keeps
    the sender going however long the body is."""
    settings = TunnelSettings(unread_stream_window=64 * 1024)
    body = os.urandom(1_000_000)

    async def answer(stream: H2Stream) -> None:
        await stream.send_response(200)
        await stream.send_data(body, end_stream=True)

    async with session_pair(answer, settings) as (client, _):
        stream = await client.open_stream("GET", "/status")
        await stream.end()
        with trio.fail_after(10):
            await stream.receive_response()
            got = b"".join([chunk async for chunk in stream.iter_data(open_window=False)])
        assert got == body
        assert not stream._window_opened


async def test_flow_control_stops_the_sender_until_the_consumer_reads() -> None:
    settings = TunnelSettings(stream_window=256 * 1024, connection_window=16 * 1024 * 1024)
    release = trio.Event()
    received: list[int] = []

    async def slow_printer(stream: H2Stream) -> None:
        await release.wait()
        async for chunk in stream.iter_data():
            received.append(len(chunk))
        await stream.send_response(200, end_stream=True)

    async with session_pair(slow_printer, settings) as (client, _server):
        stream = await client.open_stream("POST", "/v1/jobs/slow")
        sent = 0
        with trio.move_on_after(1) as blocked:
            while True:
                await stream.send_data(b"x" * 16384)
                sent += 16384
        # The sender stalled once it had filled the stream window the consumer has not acknowledged.
        assert blocked.cancelled_caught
        assert sent <= settings.stream_window
        assert client.stats.flow_stalls > 0
        release.set()
        with trio.fail_after(10):
            await stream.send_data(b"y" * 2_000_000, end_stream=True)
            await stream.receive_response()
        assert sum(received) == sent + 2_000_000


async def test_ping_measures_rtt_and_a_silent_peer_is_declared_dead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = TunnelSettings(ping_interval=15, dead_after=45)
    left, right = trio.testing.memory_stream_pair()
    client = H2Session(left, client_side=True, settings=settings)
    server = H2Session(BlackHole(right), client_side=False, settings=settings, handler=echo_digest)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        server_scope = trio.CancelScope()

        async def run_server() -> None:
            with server_scope:
                await server.run()

        nursery.start_soon(run_server)
        await trio.sleep(16)
        assert client.stats.last_rtt is not None
        # Freeze the connector: its tasks stop, but the transport stays open (a black-holed path).
        frozen_at = trio.current_time()
        server_scope.cancel()
        with trio.fail_after(120):
            await client.finished.wait()
        assert trio.current_time() - frozen_at <= 45 + 15
        assert "silent" in (client.close_reason or "")


class Stuck(trio.abc.Stream):
    """A transport that takes no bytes and brings none: a peer that stopped reading."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.sleep_forever()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.sleep_forever()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        pass


async def test_a_closing_session_sends_no_ping_while_its_last_bytes_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The close waits up to a second for the GOAWAY to leave; a PING due meanwhile used to raise h2's
    # ProtocolError out of the session (1,224 of 5,000 connectors gave up that way in a relay restart).
    session = H2Session(Stuck(), client_side=False, settings=TunnelSettings(ping_interval=0.25))
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)
        session.close("going away")
        with trio.fail_after(5):
            await session.finished.wait()
    assert session.close_reason == "going away"
    assert session.stats.pings_sent == 0


async def test_the_relay_side_pings_only_a_quiet_peer_and_once_a_minute_for_the_rtt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = TunnelSettings(ping_interval=15, dead_after=45, rtt_interval=60)
    left, right = trio.testing.memory_stream_pair()
    relay = H2Session(left, client_side=True, settings=settings)
    connector = H2Session(right, client_side=False, settings=settings, handler=echo_digest)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        await nursery.start(connector.run)
        await trio.sleep(610)
        assert relay.is_open and connector.is_open
        nursery.cancel_scope.cancel()
    assert connector.stats.pings_sent == 40
    assert relay.stats.last_rtt is not None
    # the first PING at 15 s, then one per rtt_interval: the connector's PINGs show it is alive
    assert relay.stats.pings_sent == 1 + (610 - 15) // 60


async def test_a_session_killed_mid_stream_fails_the_stream() -> None:
    got_some = trio.Event()

    async def printer(stream: H2Stream) -> None:
        async for _ in stream.iter_data():
            got_some.set()

    left, right = trio.testing.memory_stream_pair()
    client = H2Session(left, client_side=True)
    server = H2Session(right, client_side=False, handler=printer)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await nursery.start(server.run)
        stream = await client.open_stream("POST", "/v1/jobs/dies")
        await stream.send_data(b"z" * 100_000)
        with trio.fail_after(5):
            await got_some.wait()
        await right.aclose()  # the tunnel drops
        with trio.fail_after(5), pytest.raises((StreamClosed, SessionClosed)):
            await stream.receive_response()
        with trio.fail_after(5):
            await client.finished.wait()
        with pytest.raises(SessionClosed):
            await client.open_stream("GET", "/v1/printers")
        nursery.cancel_scope.cancel()


async def test_server_reset_is_seen_by_the_client() -> None:
    async def refuse(stream: H2Stream) -> None:
        stream.reset(8)

    async with session_pair(refuse) as (client, _):
        stream = await client.open_stream("POST", "/v1/jobs/r")
        with trio.fail_after(5), pytest.raises(StreamClosed) as info:
            await stream.receive_response()
        assert info.value.error_code == 8


async def test_a_reset_after_the_whole_body_was_sent_is_a_closed_stream_not_a_short_body() -> None:
    """The relay cancels a job whose payload already went out whole (END_STREAM) but waits unread at the
    connector: the unread rest is dropped, so the body must not look as if it had ended normally."""
    outcome: list[object] = []
    done = trio.Event()

    async def reads_late(stream: H2Stream) -> None:
        outcome.append(await stream.wait_closed())  # the reset arrived; nothing was read yet
        try:
            async for chunk in stream.iter_data():
                outcome.append(chunk)
        except StreamClosed as exc:
            outcome.append(exc.error_code)
        done.set()

    async with session_pair(reads_late) as (client, _):
        stream = await client.open_stream("POST", "/v1/jobs/c")
        await stream.send_data(b"sealed payload", end_stream=True)
        stream.reset(ErrorCodes.CANCEL)
        with trio.fail_after(5):
            await done.wait()
    assert outcome == [ErrorCodes.CANCEL, ErrorCodes.CANCEL]


async def test_close_sends_goaway_and_both_sides_end() -> None:
    gate = trio.Event()

    async def waits(stream: H2Stream) -> None:
        await gate.wait()

    async with session_pair(waits) as (client, server):
        stream = await client.open_stream("POST", "/v1/jobs/a")
        await stream.send_data(b"abc", end_stream=True)
        await trio.testing.wait_all_tasks_blocked()
        server.close("connector shutting down")
        with trio.fail_after(5):
            await client.finished.wait()
            await server.finished.wait()
        assert "GOAWAY" in (client.close_reason or "")
        with pytest.raises(StreamClosed):
            await stream.receive_response()
        with pytest.raises(SessionClosed):
            await client.open_stream("POST", "/v1/jobs/b")


async def test_streams_waiting_for_their_printer_do_not_starve_the_one_being_printed() -> None:
    """One printer, one job at a time (the connector's ``printer.busy``): the streams queued behind it are
    not read, and must not use up the connection window that the job being printed needs."""
    settings = TunnelSettings()  # 8 MiB per stream being read, 16 MiB per connection
    printer = trio.Lock()
    printed: dict[str, int] = {}

    async def one_printer(stream: H2Stream) -> None:
        async with printer:
            printed[stream.path] = sum([len(chunk) async for chunk in stream.iter_data()])
        await stream.send_response(200, end_stream=True)

    async def submit(client: H2Session, path: str, size: int) -> None:
        stream = await client.open_stream("POST", path)
        await stream.send_data(b"x" * size, end_stream=True)
        await stream.receive_response()

    async with session_pair(one_printer, settings) as (client, _server):
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for n in range(8):  # 8 x 4 MiB waiting would be 32 MiB of a 16 MiB connection window
                    nursery.start_soon(submit, client, f"/v1/jobs/{n}", 4 * 1024 * 1024)
                nursery.start_soon(submit, client, "/v1/jobs/big", 20 * 1024 * 1024)
    assert printed == {
        **{f"/v1/jobs/{n}": 4 * 1024 * 1024 for n in range(8)},
        "/v1/jobs/big": 20 * 1024 * 1024,
    }


async def test_finished_streams_leave_the_stream_tables_of_both_sides() -> None:
    """Streams closed by END_STREAM both ways, or by a reset, are forgotten: no table grows per job."""

    async def answer_then_maybe_reset(stream: H2Stream) -> None:
        if stream.path == "/reset":
            stream.reset()
            return
        await echo_digest(stream)

    async with session_pair(answer_then_maybe_reset) as (client, server):
        for _ in range(20):
            await post(client, os.urandom(1000))
        stream = await client.open_stream("POST", "/reset")
        with pytest.raises(StreamClosed):
            await stream.receive_response()
        await trio.testing.wait_all_tasks_blocked()
        assert client._streams == {} and server._streams == {}
