"""The tunnel's WebSocket layer (tunnel/wsstream.py) over in-memory streams: the upgrade from both ends,
frames cut anywhere, and each way a peer can break the protocol."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, Request, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.handshake import H11Handshake

from loadtest import bench_websocket
from loadtest.bench_websocket import idle
from relay.tunnel import read_request_head
from tunnel.wsstream import (
    MAX_MESSAGE_BYTES,
    MAX_PINGS_PER_SECOND,
    MAX_REFUSAL_BYTES,
    MAX_TINY_FRAMES,
    SUBPROTOCOL,
    HandshakeFailed,
    NotAnUpgrade,
    UpgradeRequest,
    WebSocketRejected,
    WebSocketStream,
    connect,
)

pytestmark = pytest.mark.timeout(30)
TOKEN = [(b"authorization", b"Bearer t")]


async def client(transport: trio.abc.Stream) -> WebSocketStream:
    with trio.fail_after(5):
        return await connect(transport, "relay", "/v1/tunnel", subprotocols=[SUBPROTOCOL], headers=TOKEN)


async def request_of(transport: trio.abc.Stream) -> UpgradeRequest:
    with trio.fail_after(5):
        received = await read_request_head(transport)
    assert received is not None
    return UpgradeRequest.parse(*received)


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[WebSocketStream, WebSocketStream]]:
    """Our client and our server, upgraded over a memory stream."""
    near, far = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        accepted: list[WebSocketStream] = []

        async def serve() -> None:
            request = await request_of(far)
            accepted.append(await request.upgrade(far, SUBPROTOCOL, [(b"x-printrelay-replica", b"r1")]))

        nursery.start_soon(serve)
        ws = await client(near)
    assert dict(ws.headers)[b"x-printrelay-replica"] == b"r1"
    assert accepted[0].headers == [] and accepted[0].transport is far
    yield ws, accepted[0]


@asynccontextmanager
async def raw_peer() -> AsyncIterator[tuple[WebSocketStream, Connection, trio.abc.Stream]]:
    """Our client against a server driven frame by frame with wsproto."""
    near, far = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        raw: list[Connection] = []

        async def serve() -> None:
            answer, connection = (await request_of(far)).accept(SUBPROTOCOL, [])
            await far.send_all(answer)
            raw.append(connection)

        nursery.start_soon(serve)
        ws = await client(near)
    yield ws, raw[0], far


async def receive_exactly(ws: trio.abc.Stream, size: int) -> bytes:
    got = bytearray()
    with trio.fail_after(5):
        while len(got) < size:
            data = await ws.receive_some()
            assert data, f"stream ended after {len(got)} of {size} bytes"
            got += data
    return bytes(got)


async def events_from(transport: trio.abc.Stream, raw: Connection) -> list[Event]:
    """What our side sent, as the raw peer's events (until something arrives)."""
    with trio.fail_after(5):
        while True:
            raw.receive_data(bytes(await transport.receive_some()))
            events = list(raw.events())
            if events:
                return events


async def test_bytes_cross_both_ways_whatever_the_write_sizes() -> None:
    body = os.urandom(3 * 1024 * 1024 + 17)
    async with pair() as (ws, server):
        async with trio.open_nursery() as nursery:
            # Larger than a batch: split into messages of MAX_BATCH_BYTES; and one byte at a time.
            nursery.start_soon(ws.send_all, memoryview(body))
            assert await receive_exactly(server, len(body)) == body
        for byte in b"tiny":
            await server.send_all(bytes([byte]))
        assert await receive_exactly(ws, 4) == b"tiny"


async def test_the_upgrade_and_every_frame_may_arrive_one_byte_at_a_time() -> None:
    near, far = trio.testing.memory_stream_pair()
    upgrade = [b""]

    async def trickle(data: bytes) -> None:
        for i in range(len(data)):
            await near.send_all(data[i : i + 1])
            await trio.testing.wait_all_tasks_blocked()

    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            request = await request_of(far)
            assert request.path == "/v1/tunnel" and request.headers["authorization"] == "Bearer t"
            ws = await request.upgrade(far, SUBPROTOCOL, [])
            assert await receive_exactly(ws, 600) == b"ab" * 300
            upgrade[0] = b"done"

        nursery.start_soon(serve)
        # The client's request, cut into single bytes.
        handshake = H11Handshake(ConnectionType.CLIENT)
        request = Request(host="relay", target="/v1/tunnel", subprotocols=[SUBPROTOCOL], extra_headers=TOKEN)
        await trickle(handshake.send(request))
        with trio.fail_after(5):
            while handshake.connection is None:
                handshake.receive_data(bytes(await near.receive_some()))
                list(handshake.events())
        frames = handshake.connection.send(BytesMessage(data=b"ab" * 100))
        frames += handshake.connection.send(BytesMessage(data=b"ab" * 200))
        await trickle(frames)
    assert upgrade[0] == b"done"


async def test_frames_sent_with_the_101_are_read_without_waiting_for_more() -> None:
    near, far = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            answer, connection = (await request_of(far)).accept(SUBPROTOCOL, [])
            await far.send_all(answer + connection.send(BytesMessage(data=b"preface")))

        nursery.start_soon(serve)
        ws = await client(near)
        assert await receive_exactly(ws, 7) == b"preface"


async def test_a_ping_is_answered_and_the_data_around_it_flows_on() -> None:
    async with raw_peer() as (ws, raw, far):
        await far.send_all(
            raw.send(BytesMessage(data=b"one", message_finished=False))
            + raw.send(Ping(payload=b"are you there"))
            + raw.send(BytesMessage(data=b"two"))
        )
        assert await receive_exactly(ws, 6) == b"onetwo"
        assert await events_from(far, raw) == [Pong(payload=b"are you there")]


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([TextMessage(data="a text message")], CloseReason.UNSUPPORTED_DATA),
        # Fragmented, so that no single frame is large: the message as a whole is what counts.
        (
            [BytesMessage(data=b"x" * 65536, message_finished=False)] * (MAX_MESSAGE_BYTES // 65536)
            + [BytesMessage(data=b"x")],
            CloseReason.MESSAGE_TOO_BIG,
        ),
        ([Ping(payload=b"%d" % i) for i in range(MAX_PINGS_PER_SECOND + 1)], CloseReason.POLICY_VIOLATION),
        # Empty frames: each costs the reader as much as a full one.
        (
            [BytesMessage(data=b"", message_finished=False)] * 2 * MAX_TINY_FRAMES,
            CloseReason.POLICY_VIOLATION,
        ),
    ],
    ids=["text", "too-big", "ping-flood", "tiny-frame-flood"],
)
async def test_a_message_the_tunnel_does_not_carry_breaks_the_stream_and_closes_with_its_code(
    frames: list[Event], code: int
) -> None:
    async with raw_peer() as (ws, raw, far):
        data = b"".join(raw.send(frame) for frame in frames)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(far.send_all, data)
            with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
                while True:
                    await ws.receive_some()
            with trio.move_on_after(0.5):
                await ws.aclose()  # the raw peer does not answer our Close
        sent = await events_from(far, raw)
        while not isinstance(sent[-1], CloseConnection):
            sent += await events_from(far, raw)
        assert sent[-1] == CloseConnection(code=code, reason="")
        assert all(isinstance(event, Pong) for event in sent[:-1])  # PINGs under the cap were answered


async def test_a_close_from_the_peer_ends_the_stream_after_its_data_and_is_answered() -> None:
    async with raw_peer() as (ws, raw, far):
        await far.send_all(raw.send(BytesMessage(data=b"last words")) + raw.send(CloseConnection(code=1001)))
        assert await receive_exactly(ws, 10) == b"last words"
        assert await ws.receive_some() == b""
        with trio.fail_after(5):
            await ws.aclose()
        assert await events_from(far, raw) == [CloseConnection(code=1000, reason="")]
        with pytest.raises(trio.ClosedResourceError):
            await ws.transport.send_all(b"x")


async def test_our_close_waits_for_the_peers_close_within_the_callers_bound() -> None:
    async with raw_peer() as (ws, raw, far):
        with trio.move_on_after(0.2) as waited:
            await ws.aclose()  # the raw peer never answers
        assert waited.cancelled_caught
        assert await events_from(far, raw) == [CloseConnection(code=1000, reason="")]
        with pytest.raises(trio.ClosedResourceError):
            await ws.transport.send_all(b"x")  # closed regardless


HEAD = (
    b"GET /v1/tunnel HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: %s\r\n\r\n"
)


@pytest.mark.parametrize(
    ("head", "status", "says"),
    [
        (HEAD % (b"relay", b"12"), 426, "Sec-WebSocket-Version"),
        (HEAD % (b"\xff\xfe", b"13"), 400, "not a WebSocket upgrade"),  # a Host that is not IDNA
        (HEAD.replace(b"GET", b"POST") % (b"relay", b"13"), 400, "method must be GET"),
        (b"GET /v1/tunnel HTTP/1.1\r\nHost: relay\r\n\r\n", 400, "Upgrade"),
        (b"\x16\x03\x01 not http at all\r\n\r\n", 400, "not a WebSocket upgrade"),
    ],
)
def test_requests_that_are_not_upgrades_get_an_answer_not_an_exception(
    head: bytes, status: int, says: str
) -> None:
    with pytest.raises(NotAnUpgrade) as refused:
        UpgradeRequest.parse(head)
    assert refused.value.status == status
    assert says in str(refused.value)
    if status == 426:
        assert refused.value.headers == [(b"Sec-WebSocket-Version", b"13")]


async def test_a_refusal_reaches_the_connector_with_its_status_headers_and_body() -> None:
    near, far = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def refuse() -> None:
            await request_of(far)
            await far.send_all(
                b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 7\r\nconnection: close\r\n\r\n"
            )
            await far.send_all(b"relay busy\n")
            await far.aclose()  # a body that ends with the connection

        nursery.start_soon(refuse)
        with pytest.raises(WebSocketRejected) as refused:
            await client(near)
    assert refused.value.status_code == 503
    assert (b"retry-after", b"7") in refused.value.headers
    assert refused.value.body == b"relay busy\n"


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (
            b"HTTP/1.1 101 Switching Protocols\r\nX: " + b"x" * MAX_REFUSAL_BYTES,
            "not a WebSocket upgrade answer",
        ),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Protocol: \xe9\r\n\r\n",
            "UnicodeDecodeError",  # a header wsproto decodes as ASCII: the attempt fails, not the connector
        ),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: wrong\r\n\r\n",
            "Bad accept token",
        ),
        (b"HTTP/1.1 101 Switch", "closed during the WebSocket upgrade"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not a WebSocket upgrade answer"),
    ],
)
async def test_answers_that_are_not_upgrades_fail_the_handshake_clearly(answer: bytes, says: str) -> None:
    near, far = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def answer_badly() -> None:
            await request_of(far)
            await far.send_all(answer)
            await far.aclose()

        nursery.start_soon(answer_badly)
        with pytest.raises(HandshakeFailed, match=says):
            await client(near)


async def test_a_long_refusal_keeps_its_status_and_retry_after_and_an_interim_answer_is_skipped() -> None:
    near, far = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def refuse_at_length() -> None:
            await request_of(far)
            head = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 9\r\ncontent-length: %d\r\n\r\n"
            await far.send_all(head % (4 * MAX_REFUSAL_BYTES) + b"<html>" * MAX_REFUSAL_BYTES)

        nursery.start_soon(refuse_at_length)
        with pytest.raises(WebSocketRejected) as refused:
            await client(near)
    assert refused.value.status_code == 503 and (b"retry-after", b"9") in refused.value.headers
    assert 0 < len(refused.value.body) <= MAX_REFUSAL_BYTES

    near, far = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def continue_then_accept() -> None:
            answer, connection = (await request_of(far)).accept(SUBPROTOCOL, [])
            await far.send_all(
                b"HTTP/1.1 100 Continue\r\n\r\n" + answer + connection.send(BytesMessage(data=b"hi"))
            )

        nursery.start_soon(continue_then_accept)
        ws = await client(near)
        assert await receive_exactly(ws, 2) == b"hi"


async def test_an_answer_without_our_subprotocol_fails_the_handshake() -> None:
    near, far = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def accept_without() -> None:
            request = await request_of(far)
            await far.send_all(request.accept(None, [])[0])  # type: ignore[arg-type]

        nursery.start_soon(accept_without)
        with pytest.raises(HandshakeFailed, match="subprotocol None"):
            await client(near)


async def test_the_layer_runs_no_task_of_its_own_and_the_benchmark_still_runs(tmp_path: Path) -> None:
    """An idle tunnel over this layer has the tasks of HTTP/2 over bare TCP (trio-websocket added a reader
    per end); ``loadtest/bench_websocket.py`` measures it, and runs here in small."""
    ours, bare = await idle("printrelay", 20), await idle("tcp", 20)
    assert ours["tasks_per_session_pair"] == bare["tasks_per_session_pair"]
    theirs = await idle("trio-websocket", 20)
    assert theirs["tasks_per_session_pair"] == ours["tasks_per_session_pair"] + 2
    await trio.to_thread.run_sync(
        bench_websocket.main,
        ["--rounds", "1", "--bulk-mib", "4", "--streams", "50", "--sessions", "5", "--out", str(tmp_path)],
    )
    cases = json.loads((tmp_path / "websocket.json").read_text())["cases"]
    assert set(cases) == {"bulk", "small", "idle"} and set(cases["bulk"]) == {
        "printrelay",
        "trio-websocket",
        "tcp",
    }
